"""Generation on a compressed cache: prefill once (compressing), then greedy-decode answers.

After eviction a layer's cache is shorter than the text it stands for. Two facts follow, and
this loop honours both (so does ``model.generate`` under ``with press(model):``):

* RoPE positions continue from the *original* length: explicit ``position_ids``;
* the 2-D ``attention_mask`` passed to the model stays the mask of the original text plus the
  tokens added since (what ``generate`` passes, and what sliding-window layers need); the
  compressed layers attend through their own :class:`~kvpress_chunk.modes.routing.LayerView`
  (kept slots, per row and head), routed by :mod:`kvpress_chunk.modes.routing`.

A :class:`CompressedContext` carries the cache together with those views, so it can be copied,
decoded after the ``with press(model):`` block, or by several questions in turn.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .decoding import READING_ATTR, warn_if_decoding_outside_its_press
from .hf.hooks import cache_keyword, find_attention_layers, windowed_layers
from .modes.routing import LayerView, attached_views, compressed_attention, router_of
from .press import Press


@dataclass
class CompressedContext:
    """A prefilled (and possibly compressed) cache plus what is needed to continue from it.

    ``attention_mask[B, L]``: the 2-D mask of the text so far (prefill padding, then every token
    added since), in original coordinates; ``next_positions[B]``: RoPE position of each row's
    next token; ``last_logits[B, V]``: the next-token logits after the last token the cache holds
    (kept current by :func:`greedy_continue` and :func:`teacher_forced_logits`: a context saved
    after answering once held the prefill's, so its first token continued the prompt instead);
    ``layer_views``: layer -> :class:`LayerView` of each compressed layer (empty when nothing was
    compressed by this library).
    """

    cache: object
    next_positions: torch.Tensor
    attention_mask: torch.Tensor
    last_logits: torch.Tensor
    layer_views: dict[int, LayerView] = field(default_factory=dict)
    #: ``int64[B]`` kept tokens measured at prefill for a cache compressed by another library's
    #: press (see :func:`kept_in_cache`); ``None`` otherwise
    measured_kept: torch.Tensor | None = None
    #: layer -> the key mask another library's press left on that layer's attention module at
    #: prefill (kvpress' ``masked_key_indices``: AdaKV, ExpectedAttention under AdaKV, KVzip).
    #: Why on the context: the mask lives on the *model*, so the next prefill replaced it (ours
    #: clears it) and a context continued after it attended to every key it had masked (tiny
    #: Llama, AdaKV at 0.7: the full cache's answer while reporting 24 of 80 tokens kept).
    #: :func:`routed` puts it back on the modules while the context is continued.
    module_masks: dict[int, tuple] | None = None

    def copy(self) -> "CompressedContext":
        """An independent copy, so several questions can start from the same context."""
        cache = copy.deepcopy(self.cache)  # carries its own views and continuation state
        carried = attached_views(cache)
        return CompressedContext(
            cache, self.next_positions.clone(), self.attention_mask.clone(), self.last_logits,
            carried if carried is not None else dict(self.layer_views),
            None if self.measured_kept is None else self.measured_kept.clone(),
            None if self.module_masks is None else dict(self.module_masks),
        )

    def kept_per_row(self) -> torch.Tensor:
        """``int64[B]``: prefix tokens each row still attends to, per compressed layer and KV head
        on average (mean over the compressed layers and their KV heads, rounded to the nearest
        token), so pyramid / global budgets and head-adaptive (ragged) selections report the cache
        they keep, not their first layer's share. Sliding-window layers are not counted. The real
        prefill tokens when nothing was compressed."""
        if self.measured_kept is not None:
            return self.measured_kept.clone()
        if self.layer_views:
            per_layer = torch.stack([
                view.visible.sum(dim=-1).to(torch.float32).mean(dim=1) for view in self.layer_views.values()
            ])  # [layers, B]
            return per_layer.mean(dim=0).round().to(torch.int64)
        return self.next_positions.clone()

    def save(self, path, model: nn.Module, press: Press | None = None, **meta):
        """Write this context to one ``.safetensors`` file (see :func:`~kvpress_chunk.saved_context.save_context`)."""
        from .saved_context import save_context

        return save_context(self, path, model, press, **meta)

    @classmethod
    def load(cls, path, model: nn.Module) -> "CompressedContext":
        """A context saved by :meth:`save`, for ``model`` (see :func:`~kvpress_chunk.saved_context.load_context`)."""
        from .saved_context import load_context

        return load_context(path, model)


def new_cache(model: nn.Module):
    """An empty ``DynamicCache`` for ``model`` (per-layer-type layers where the config says so)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56 has no config argument
        return DynamicCache()


@torch.inference_mode()
def prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    press: Press | None = None,
    tokenizer=None,
) -> CompressedContext:
    """Run the prompt through ``model`` (left-padded batch allowed), compressing with ``press``
    (or with the press already applied by an enclosing ``with press(model):``). ``tokenizer``
    is handed to presses whose scorer runs a context pass (``kvzip``)."""
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model.device)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    cache = new_cache(model)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        cache_keyword(model): cache,
        "use_cache": True,
        "logits_to_keep": 1,
    }
    attention = find_attention_layers(model)
    for _, module in attention:  # a mask left by an earlier kvpress run is stale
        if getattr(module, "masked_key_indices", None) is not None:
            module.masked_key_indices = None
    with applied(press, model, tokenizer):
        out = model(**kwargs)
        router = router_of(model)
        # The live table (not a snapshot): decoding-time compression updates it later, and a
        # context continued after the block must route through what the cache holds then.
        views = (router.live_views(cache) if router is not None else None) or {}
    measured = None if views else kept_in_cache(model, attention, cache, attention_mask)
    if measured is not None and bool((measured == attention_mask.sum(dim=-1)).all()):
        measured = None  # nothing compressed: the context's own positions say it, as it grows
    masks = None if views else {
        idx: module.masked_key_indices for idx, module in attention if getattr(module, "masked_key_indices", None) is not None
    }
    return CompressedContext(cache, attention_mask.sum(dim=-1), attention_mask, out.logits[:, -1], views, measured,
                             masks or None)


def kept_in_cache(
    model: nn.Module, attention: list[tuple[int, nn.Module]], cache, attention_mask: torch.Tensor
) -> torch.Tensor | None:
    """``int64[B]``: tokens each row attends to in a cache this library did not compress (no
    views): mean over the layers that are not sliding-window layers of each layer's slots, less
    the row's left padding and, for a press of another library that masks keys in place
    (kvpress' ``module.masked_key_indices``: AdaKV, ExpectedAttention under AdaKV, KVzip), less
    its masked keys per KV head (``attention``: the model's ``find_attention_layers``); like :meth:`CompressedContext.kept_per_row`. ``None`` when
    every layer slides or the cache has no per-layer tensors.

    Why per layer: the cache's length is its first layer's. A masking press keeps the full
    length (the leaderboard recorded kvpress' AdaKV at 0.9 as keeping all 2048 tokens), a
    per-layer budget (kvpress' PyramidKV) gives the first layer the most (284 reported for a
    mean of 150), and on Gemma 2/3 the first layer slides (every kvpress press reported
    "nothing removed")."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    windowed = windowed_layers(model, attention)
    padding = (attention_mask.shape[-1] - attention_mask.sum(dim=-1)).to(torch.float32)  # left padding
    per_layer = []
    for idx, module in attention:
        keys = getattr(layers[idx], "keys", None) if idx < len(layers) else None
        if idx in windowed or getattr(layers[idx], "is_sliding", False) or not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            continue
        kv_heads, length = keys.shape[1], keys.shape[2]
        visible = float(length) - padding.to(keys.device)
        mask = getattr(module, "masked_key_indices", None)
        if mask is not None:
            batch = attention_mask.shape[0]
            masked = torch.bincount(mask[0].to(keys.device), minlength=batch)[:batch].to(torch.float32)
            visible = visible - masked / kv_heads
        per_layer.append(visible)
    if not per_layer:
        return None
    return torch.stack(per_layer).mean(dim=0).round().to(torch.int64)


@torch.inference_mode()
def greedy_continue(
    model: nn.Module,
    context: CompressedContext,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``input_ids[B, Q]`` (e.g. a question) after the context, then decode greedily.

    ``attention_mask[B, Q]`` (optional): which of ``input_ids`` are real tokens, for a padded
    batch of questions of different lengths (left or right padding). Without it every id is fed
    as a real token, padding included. Padding is never fed: each row's question follows its
    context directly, as if the row were alone (the rows' common length in one forward, then one
    token per row per forward, each row starting its answer as soon as its question is in).

    Mutates ``context`` (pass ``context.copy()`` to keep it). Returns the new tokens
    ``[B, <= max_new_tokens]``; rows that finished early are padded with their EOS token (with
    a padded question batch, a row that has all its tokens keeps repeating its last one while
    longer questions finish, and those repeats stay in the context). ``max_new_tokens=0`` feeds
    ``input_ids`` and generates nothing (it fed nothing once: the context silently lacked them).
    """
    warn_if_decoding_outside_its_press(model, context.cache)
    device = model.device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("max_new_tokens=0 with a padded batch of questions: feed the rows one at a time, or "
                             "generate at least one token")
        teacher_forced_logits(model, context, input_ids)
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask.bool().all()):
            return _ragged_continue(model, context, input_ids, attention_mask.bool(), max_new_tokens, eos_token_ids)
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    mask = context.attention_mask
    positions = context.next_positions.to(device)
    step_ids = input_ids
    with routed(model, context) as router:
        for _ in range(max_new_tokens):
            out, mask, positions = forward_after(model, context.cache, mask, positions, step_ids, logits_to_keep=1)
            next_token = out.logits[:, -1].argmax(dim=-1)
            if eos.numel():
                next_token = torch.where(finished, generated[-1] if generated else next_token, next_token)
                finished = finished | torch.isin(next_token, eos)
            generated.append(next_token)
            step_ids = next_token[:, None]
            context.last_logits = out.logits[:, -1]  # after the last token the cache holds, as prefill's
            if bool(finished.all()):
                break
    context.attention_mask, context.next_positions = mask, positions
    if not generated:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    return torch.stack(generated, dim=1)


def _ragged_continue(model: nn.Module, context: CompressedContext, input_ids: torch.Tensor, real: torch.Tensor,
                     max_new_tokens: int, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """:func:`greedy_continue` for questions of different lengths (``real[B, Q]``): no padding
    enters the cache. The rows' common length goes in one forward, then every forward feeds one
    token per row: the next question token of a row still reading its question, else the token
    it just generated."""
    device = input_ids.device
    batch = input_ids.shape[0]
    rows = [input_ids[r][real[r]] for r in range(batch)]
    lengths = torch.tensor([len(row) for row in rows], device=device)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"row(s) {empty} of input_ids are all padding: every row needs at least one token to feed")
    width = int(lengths.max())
    questions = torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows])  # right-aligned at 0
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=torch.long)
    generated = torch.zeros(batch, max(0, max_new_tokens), dtype=torch.long, device=device)
    produced = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    mask = context.attention_mask
    positions = context.next_positions.to(device)
    fed = int(lengths.min())
    step_ids = questions[:, :fed]
    arange = torch.arange(batch, device=device)
    cache = context.cache
    with routed(model, context):
        while max_new_tokens > 0:
            # Rows still reading their question: a decoding press must not compress them in the
            # middle of it (alone, the question goes in at once). Cleared after every forward.
            reading = lengths > fed
            cache.__dict__[READING_ATTR] = reading
            try:
                out, mask, positions = forward_after(model, cache, mask, positions, step_ids, logits_to_keep=1)
            finally:
                cache.__dict__.pop(READING_ATTR, None)
            answering = ~reading & ~finished & (produced < max_new_tokens)
            next_token = out.logits[:, -1].argmax(dim=-1)
            context.last_logits = out.logits[:, -1]  # every row fed one token: after each row's last
            slot = produced.clamp(max=max_new_tokens - 1)
            generated[arange[answering], slot[answering]] = next_token[answering]
            if eos.numel():
                finished = finished | (answering & torch.isin(next_token, eos))
            produced = produced + answering.to(torch.long)
            if bool((finished | (produced >= max_new_tokens)).all()):
                break
            last = generated[arange, (produced - 1).clamp(min=0)]
            step_ids = torch.where(reading, questions[:, min(fed, width - 1)], last)[:, None]
            fed += 1
    context.attention_mask, context.next_positions = mask, positions
    width = int(produced.max()) if batch else 0
    out = generated[:, :width]
    if width:  # rows that finished early repeat their EOS (their last token), as greedy_continue does
        filler = generated[arange, (produced - 1).clamp(min=0)][:, None].expand(-1, width)
        out = torch.where(torch.arange(width, device=device) < produced[:, None], out, filler)
    return out


@torch.inference_mode()
def teacher_forced_logits(model: nn.Module, context: CompressedContext, input_ids: torch.Tensor) -> torch.Tensor:
    """Feed ``input_ids[B, Q]`` after the context in one forward; ``float32[B, Q, V]``: the
    next-token logits after each of them. With ``context.last_logits`` (read before the call) in
    front, they are the model's predictions of ``input_ids`` themselves (what the fidelity eval
    scores). Mutates ``context`` like :func:`greedy_continue` (``last_logits`` too)."""
    device = model.device
    input_ids = input_ids.to(device)
    with routed(model, context) as router:
        out, context.attention_mask, context.next_positions = forward_after(
            model, context.cache, context.attention_mask, context.next_positions.to(device), input_ids, logits_to_keep=0
        )
    context.last_logits = out.logits[:, -1].clone()  # not a view keeping every position's logits alive
    return out.logits.float()


@contextlib.contextmanager
def routed(model: nn.Module, context: CompressedContext):
    """Route ``context``'s compressed layers through their views for the block (the views the
    context holds, else those its cache carries); no router when nothing was compressed. A
    context another library's press masked (:attr:`CompressedContext.module_masks`) has its
    masks put back on the attention modules for the block (whatever another prefill left there
    is restored after)."""
    views = context.layer_views or attached_views(context.cache)
    if not views:
        with _module_masks(model, context.module_masks):
            yield None
        return
    with compressed_attention(model) as router, router.using(context.cache, views):
        yield router


@contextlib.contextmanager
def _module_masks(model: nn.Module, masks: dict[int, tuple] | None):
    if not masks:
        yield
        return
    modules = dict(find_attention_layers(model))
    saved = {idx: getattr(modules[idx], "masked_key_indices", None) for idx in masks}
    for idx, mask in masks.items():
        modules[idx].masked_key_indices = mask
    try:
        yield
    finally:
        for idx, mask in saved.items():
            modules[idx].masked_key_indices = mask


def forward_after(model: nn.Module, cache, mask: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, logits_to_keep: int):
    """One forward of ``ids[B, Q]`` after what ``cache`` holds: the 2-D mask grows by ``Q`` real
    tokens and RoPE positions continue from ``positions[B]`` (original coordinates). Returns
    ``(output, mask, positions)`` after the step."""
    batch, length = ids.shape
    mask = torch.cat([mask, torch.ones(batch, length, dtype=mask.dtype, device=ids.device)], dim=-1)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions[:, None] + torch.arange(length, device=ids.device),
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **{cache_keyword(model): cache},
    )
    return out, mask, positions + length


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def eos_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """Tokens that end an answer: the tokenizer's and generation config's EOS, plus the chat
    end-of-turn token when the vocabulary has one (the SmolLM2 GGUF declares <|im_start|> as EOS,
    so without <|im_end|> answers would run on into a new turn)."""
    ids = set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


QUESTION_SEPARATOR = "\n\n"


def prompt_parts(tokenizer, chat_template: bool = True) -> tuple[str, str]:
    """``(prefix, suffix)`` around ``context + QUESTION_SEPARATOR + question``: the chat template's
    parts when the tokenizer has one (and ``chat_template``), else ``("", "\n")``. One rule for
    the library, the eval and the CLI."""
    from .hf.models import chat_prompt_parts

    if chat_template and getattr(tokenizer, "chat_template", None):
        return chat_prompt_parts(tokenizer)
    return "", "\n"


def encode_context(tokenizer, text: str, prefix: str) -> torch.Tensor:
    """``[1, T]`` ids of ``prefix + text``: the chat template's prefix carries the special tokens;
    without a template (``prefix == ""``) the tokenizer's own (BOS) start the text."""
    return tokenizer(prefix + text, return_tensors="pt", add_special_tokens=not prefix).input_ids


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when asked for its special tokens (Gemma's and
    Llama's ``<bos>``; none for tokenizers that add none). For code that encodes a text in pieces
    with ``add_special_tokens=False`` and must start it as :func:`encode_context` does: a base
    model fed its context without the BOS it was trained with computes other attention (Gemma 3
    makes BOS its attention sink), so every figure measured on it describes another input."""
    probe = "The quick brown fox."
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    full = list(tokenizer(probe, add_special_tokens=True).input_ids)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def encode_question(tokenizer, question: str, suffix: str) -> torch.Tensor:
    """``[1, Q]`` ids fed after a (compressed) context: blank line, question, template suffix."""
    return tokenizer(QUESTION_SEPARATOR + question + suffix, return_tensors="pt", add_special_tokens=False).input_ids


def generate_answers(
    model: nn.Module,
    tokenizer,
    context: str,
    questions: Sequence[str] | str,
    press: Press | None = None,
    max_new_tokens: int = 32,
    chat_template: bool = True,
    on_prefill: Callable[[CompressedContext], None] | None = None,
    query_aware: bool = False,
) -> list[str]:
    """Answer each question about ``context``, compressing the context once with ``press``.

    Query-agnostic by default: the questions are *not* seen while compressing (compress once, ask
    many: what a serving system does with a long document); each question starts from its own
    copy of the same compressed cache. ``query_aware=True`` prefills (and compresses) context and
    question together instead, once per question. With ``chat_template`` (default, if the
    tokenizer has one) the context and question form one user message, as kvpress' pipeline
    does. ``press`` may be ours or any press-like context manager (e.g. kvpress'). ``on_prefill``
    is called with each compressed context (e.g. to record how many tokens it kept).
    """
    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(context, str):
        raise TypeError(f"context must be a string, got {type(context).__name__}")
    prefix, suffix = prompt_parts(tokenizer, chat_template)
    eos = eos_token_ids(tokenizer, model)
    answers = []
    # Our press stays applied while answering (mask mode and views need it only for routing;
    # only prefills from an empty cache are compressed). Another library's press (kvpress) is
    # applied around each prefill only, then answering runs outside it, as kvpress' own pipeline
    # does: some of its presses compress when their block *exits* (KVzipPress), so answering
    # inside the block would use the whole cache.
    ours = press is None or isinstance(press, Press)
    foreign = None if ours else press
    with applied(press if ours else None, model, tokenizer):
        compressed = None if query_aware else prefill(model, encode_context(tokenizer, context, prefix), press=foreign,
                                                      tokenizer=tokenizer)
        if compressed is not None and on_prefill is not None:
            on_prefill(compressed)
        for question in questions:
            if compressed is not None:
                asked = encode_question(tokenizer, question, suffix)
                tokens = greedy_continue(model, compressed.copy(), asked, max_new_tokens, eos)
            else:
                whole = prefill(model, encode_context(tokenizer, context + QUESTION_SEPARATOR + question + suffix, prefix),
                                press=foreign, tokenizer=tokenizer)
                if on_prefill is not None:
                    on_prefill(whole)
                first = whole.last_logits.argmax(dim=-1, keepdim=True)
                rest = first[:, :0]
                if max_new_tokens > 1 and int(first[0, 0]) not in eos:
                    rest = greedy_continue(model, whole, first, max_new_tokens - 1, eos)
                tokens = torch.cat([first, rest], dim=-1)[:, : max(0, max_new_tokens)]  # 0 asks for none
            answers.append(tokenizer.decode(tokens[0], skip_special_tokens=True).strip())
    return answers


def applied(press, model: nn.Module, tokenizer=None):
    """``press(model)`` or a no-op context when there is no press. Our presses also get the
    tokenizer (scorers with a context pass, KVzip, encode their prompt with it)."""
    if press is None:
        return contextlib.nullcontext()
    return press(model, tokenizer=tokenizer) if isinstance(press, Press) else press(model)

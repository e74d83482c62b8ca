"""Generation on a compressed cache: prefill once (compressing), then greedy-decode answers.

Why our own loop instead of ``model.generate``: after eviction the cache is shorter than the
text it stands for. RoPE positions must continue from the *original* length, and rows of a
padded batch keep different token counts (left-padded slots). Both need explicit
``position_ids`` and a 2-D attention mask over the compressed cache, which this loop supplies.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..press import Press, PressSession, active_session


@dataclass
class CompressedContext:
    """A prefilled (and possibly compressed) cache plus what is needed to continue from it.

    ``next_positions[B]``: RoPE position of the next token of each row (its real token count);
    ``cache_mask[B, K]``: 1 on real cache slots, 0 on padding slots.
    """

    cache: object
    next_positions: torch.Tensor
    cache_mask: torch.Tensor
    last_logits: torch.Tensor

    def copy(self) -> "CompressedContext":
        """An independent copy, so several questions can start from the same context."""
        return CompressedContext(copy.deepcopy(self.cache), self.next_positions.clone(), self.cache_mask.clone(), self.last_logits)


def _new_cache(model: nn.Module):
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
) -> CompressedContext:
    """Run the prompt through ``model`` (left-padded batch allowed), compressing with ``press``."""
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model.device)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    cache = _new_cache(model)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    if press is None:
        # A press may already be applied by the caller (`with press(model): prefill(...)`).
        session = active_session(model)
        out = model(**kwargs)
    else:
        with press(model) as session:
            out = model(**kwargs)
    session_mask = session.attention_mask() if isinstance(session, PressSession) else None
    if session_mask is not None:
        cache_mask = session_mask.to(model.device)
    else:
        # No session of ours (no press, or another library's press, e.g. kvpress): batch-1 caches
        # it compressed hold only real tokens.
        kept = out.past_key_values.get_seq_length()
        cache_mask = attention_mask if kept == attention_mask.shape[-1] else attention_mask.new_ones(input_ids.shape[0], kept)
    return CompressedContext(out.past_key_values, attention_mask.sum(dim=-1), cache_mask, out.logits[:, -1])


@torch.inference_mode()
def greedy_continue(
    model: nn.Module,
    context: CompressedContext,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Feed ``input_ids[B, Q]`` (e.g. a question) after the context, then decode greedily.

    Mutates ``context`` (pass ``context.copy()`` to keep it). Returns the new tokens
    ``[B, <= max_new_tokens]``; rows that finished early are padded with their EOS token.
    """
    device = model.device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    mask = context.cache_mask
    positions = context.next_positions.to(device)
    step_ids = input_ids
    for _ in range(max_new_tokens):
        length = step_ids.shape[1]
        mask = torch.cat([mask, torch.ones(batch, length, dtype=mask.dtype, device=device)], dim=-1)
        position_ids = positions[:, None] + torch.arange(length, device=device)
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=context.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        positions = positions + length
        next_token = out.logits[:, -1].argmax(dim=-1)
        if eos.numel():
            next_token = torch.where(finished, generated[-1] if generated else next_token, next_token)
            finished = finished | torch.isin(next_token, eos)
        generated.append(next_token)
        step_ids = next_token[:, None]
        if bool(finished.all()):
            break
    context.cache_mask, context.next_positions = mask, positions
    if not generated:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    return torch.stack(generated, dim=1)


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def _eos_ids(tokenizer, model: nn.Module) -> list[int]:
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


def generate_answers(
    model: nn.Module,
    tokenizer,
    context: str,
    questions: Sequence[str] | str,
    press: Press | None = None,
    max_new_tokens: int = 32,
    chat_template: bool = True,
    on_prefill: Callable[[CompressedContext], None] | None = None,
) -> list[str]:
    """Answer each question about ``context``, compressing the context once with ``press``.

    The questions are *not* seen while compressing (compress once, ask many: what a serving
    system does with a long document). Each question starts from its own copy of the same
    compressed cache. With ``chat_template`` (default, if the tokenizer has one) the context
    and question form one user message, as kvpress' pipeline does. ``on_prefill`` is called
    once with the compressed context (e.g. to record how many tokens it kept).
    """
    from .models import chat_prompt_parts

    if isinstance(questions, str):
        questions = [questions]
    if not isinstance(context, str):
        raise TypeError(f"context must be a string, got {type(context).__name__}")
    prefix, suffix = ("", "")
    if chat_template and getattr(tokenizer, "chat_template", None):
        prefix, suffix = chat_prompt_parts(tokenizer)
    context_ids = tokenizer(prefix + context, return_tensors="pt", add_special_tokens=not prefix).input_ids
    eos = _eos_ids(tokenizer, model)
    answers = []
    # The press stays applied while answering: mask mode needs its masks during decoding (evict
    # mode is unaffected: only prefills from an empty cache are compressed).
    with applied(press, model):
        compressed = prefill(model, context_ids)
        if on_prefill is not None:
            on_prefill(compressed)
        for question in questions:
            question_ids = tokenizer(question + suffix, return_tensors="pt", add_special_tokens=False).input_ids
            tokens = greedy_continue(model, compressed.copy(), question_ids, max_new_tokens, eos)
            answers.append(tokenizer.decode(tokens[0], skip_special_tokens=True).strip())
    return answers


def applied(press, model: nn.Module):
    """``press(model)`` or a no-op context when there is no press."""
    return contextlib.nullcontext() if press is None else press(model)

"""Decoding-time compression: keep the cache bounded while generating (issue 12).

``make_press(spec, decoding={"every": N, "max_cache": M})`` (or ``decoding = {...}`` in a TOML
spec) makes the press keep compressing after the prefill. At a decode forward, per row:

* ``count`` = real tokens in the cache (or, with ``protect_prompt=True``, real *generated* tokens:
  the prompt as compressed at prefill is then never touched again);
* the row is compressed back to ``M`` tokens when ``count > M`` and either ``N`` tokens were
  generated since its last compression or ``count >= M + N``. Each row decides alone (rows
  that do not compress at a step keep every token), so a row of a left-padded batch is
  compressed exactly as it would be alone. So after the first decode step
  a row never holds more than ``M + N`` tokens (``prompt + M + N`` with ``protect_prompt``).

Compression runs in the attention hook of each layer, right after the layer's attention of that
step (as at prefill), with the press's own parts: scorer (its observation window = the hidden
states of the most recent ``window`` tokens, recorded at each forward; expected attention's
statistics: the last ``every`` tokens, ``Scorer.decode_queries``), grouper (chunks are cut
over the compressed region, so a kept chunk stays contiguous), selector with ``budget=M``,
allocator (per-layer budgets, capped at ``M``) and planner (layer reuse within the same compression pass).
Rows are independent: each row keeps its own ``M`` best tokens; padding stays hidden.

``max_cache`` must be at least the tokens the policy always keeps (observation window + sinks).

Mask mode (``apply="mask"``): the cache keeps every token; a compression replaces the layer's
view by one over the whole cache in which each row (and head) sees its ``M`` kept tokens. The
region's visible tokens are first gathered into the layout evict mode would hold (in order,
left-padded to the widest row), so the parts see the same inputs and keep the same tokens: greedy
tokens and logits equal evict mode's (tested). Memory is not bounded in mask mode (that is what
evict mode is for); the attended tokens are.

Beam search (``num_beams > 1``) is refused: it reorders the cache's rows, which would detach each
row from its compression state (:class:`BeamSearchNotSupportedError`, raised by the cache's
``reorder_cache`` at the first reorder).

Limits (raised as :class:`~kvpress_chunk.registry.SpecError` at ``make_press``):
equal token counts per head (no head-adaptive selectors / allocators), no
``count='groups'`` selector (the budget is in tokens), no sentence grouper (decode steps keep no
token ids), no ``observed`` scorer beyond ``queries=1`` (its observers are the keys' last
positions). Expected attention's statistics are over the last ``every`` generated tokens. ``global`` allocators are refused with the head-adaptive ones (they pool heads; a
whole-cache pass per step would also hold every layer's scores).
"""

from __future__ import annotations

import warnings

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .hf.growing_layer import grow_in_place
from .hf.hooks import cache_argument, call_argument
from .policies.layer_inputs import LayerInputs
from .registry import SpecError, part_name
from .modes.block_masks import KV_BLOCK_SIZE
from .modes.routing import attach_views
from .selection import Selection, gather_kv

if TYPE_CHECKING:
    from .press import Press
    from .session import PressSession


def hides_inner_slots(visible: torch.Tensor) -> bool:
    """Whether a view ``visible[B, Hs, P]`` hides a slot after a visible one (mask mode's holes),
    rather than only left padding."""
    return bool((visible[..., 1:].to(torch.int8) < visible[..., :-1].to(torch.int8)).any())


class BeamSearchNotSupportedError(ValueError):
    """Beam search (``num_beams > 1``) with decoding-time compression."""


BEAM_SEARCH_MESSAGE = (
    "decoding-time compression does not support beam search (num_beams > 1): beam search reorders the rows "
    "of the cache at every step, and each row's compression state (its kept tokens, the tokens generated "
    "since its last compression, its observation window) would no longer belong to it. Use greedy or "
    "sampled decoding (num_beams=1), or a press without decoding= (prefill compression alone works with beams)."
)


def _refuse_reorder(*args: Any, **kwargs: Any) -> None:
    raise BeamSearchNotSupportedError(BEAM_SEARCH_MESSAGE)


def guard_against_beam_search(cache: Any) -> None:
    """Make ``cache.reorder_cache`` (what ``generate`` calls for beam search, in every
    transformers we support) raise :class:`BeamSearchNotSupportedError` for this cache."""
    if hasattr(cache, "reorder_cache") and cache.__dict__.get("reorder_cache") is not _refuse_reorder:
        cache.reorder_cache = _refuse_reorder


@dataclass(frozen=True)
class Decoding:
    """``every``: compress at most every N generated tokens; ``max_cache``: tokens kept per row
    after a compression (M); ``protect_prompt``: compress generated tokens only."""

    every: int = 64
    max_cache: int = 1024
    protect_prompt: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise SpecError(f"decoding every must be an int >= 1, got {self.every!r}")
        if not isinstance(self.max_cache, int) or isinstance(self.max_cache, bool) or self.max_cache < 1:
            raise SpecError(f"decoding max_cache must be an int >= 1, got {self.max_cache!r}")
        if not isinstance(self.protect_prompt, bool):
            raise SpecError(f"decoding protect_prompt must be True or False, got {self.protect_prompt!r}")

    @classmethod
    def parse(cls, value: Any) -> "Decoding | None":
        if value is None or isinstance(value, Decoding):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"every", "max_cache", "protect_prompt"})
            if unknown:
                raise SpecError(f"unknown decoding setting(s) {unknown}; valid: every, max_cache, protect_prompt")
            return cls(**value)
        raise SpecError(f"decoding must be a dict like {{'every': 64, 'max_cache': 1024}}, got {type(value).__name__}")

    def to_spec(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        prompt = ", prompt protected" if self.protect_prompt else ""
        return f"decoding(every={self.every}, max_cache={self.max_cache}{prompt})"


def check_press(press: "Press") -> None:
    """SpecError for the combinations decoding compression does not handle (see the module doc)."""
    if press.decoding is None:
        return
    if press.apply not in ("evict", "mask"):
        raise SpecError(f"decoding compression runs with apply='evict' or 'mask', got apply={press.apply!r}")
    if press.selector.ragged_heads or press.allocator.pools_heads:
        raise SpecError("decoding compression needs equal token counts per head (no head-adaptive selectors/allocators)")
    if press.selector.needs_ratio:
        raise SpecError("decoding compression evicts to a token budget: use a selector with count='tokens'")
    if press.scorer.context_pass:
        raise SpecError(
            f"scorer {part_name(press.scorer)!r} scores with an extra pass over the whole context, run at prefill "
            "only: decoding compression needs a scorer without one"
        )
    if press.scorer.decode_queries(press.decoding.every) is None:
        raise SpecError(
            f"scorer {part_name(press.scorer)!r} reads its queries as the last positions of the keys, which a "
            "decoding compression moves: decode-time scores would come from the latest token alone. Use a window "
            "scorer (snapkv/chunkkv, tova), expected attention, or one that reads no queries (knorm, keydiff, "
            "streamingllm) with decoding="
        )
    if part_name(press.grouper) == "sentence":
        raise SpecError("decoding compression does not support the sentence grouper (it needs token ids, "
                        "which decode steps do not record): use chunk or token grouping")
    protected = press.selector.protected_count(press.scorer.window)
    if press.decoding.max_cache < protected:
        raise SpecError(
            f"decoding max_cache={press.decoding.max_cache} is below the {protected} tokens this policy always keeps "
            "(observation window + sinks): raise max_cache or shrink the window"
        )


def decode_press(press: "Press") -> "Press":
    """The press the decoding passes run: same parts, ``budget=M`` (whole-cache allocators never
    get here: :func:`check_press` refuses them)."""
    return press.replace(budget=press.decoding.max_cache, decoding=None)


#: instance attribute of a cache decoded under a press with ``decoding``: its :class:`CacheDecoding`
DECODING_ATTR = "_kvpress_chunk_decoding"

#: instance attribute set for one forward by ``greedy_continue`` on a padded batch of questions:
#: ``bool[B]``, rows still reading their question (fed one token per forward). They do not
#: compress in that forward: alone, a row's question goes in one forward, with no compression
#: in the middle of it.
READING_ATTR = "_kvpress_chunk_reading"


class DecodingOutsideThePressWarning(RuntimeWarning):
    """A cache prefilled under a press with ``decoding`` is continued where no such press runs."""


#: instance attribute of a cache once :func:`warn_if_decoding_outside_its_press` warned for it
WARNED_ATTR = "_kvpress_chunk_decoding_warned"


def warn_if_decoding_outside_its_press(model: Any, cache: Any) -> None:
    """Warn once per cache when a cache prefilled (or decoded) under a press with ``decoding`` is
    continued with no such press applied to ``model``.

    Why: decoding-time compression runs in the press's hooks, so outside its ``with`` block the
    cache grows past ``max_cache`` and the answers are those of the press without ``decoding``:
    the bound the user asked for silently did not hold (``greedy_continue`` after the block)."""
    attributes = getattr(cache, "__dict__", {})
    if attributes.get(DECODING_ATTR) is None or attributes.get(WARNED_ATTR):
        return
    from .session import active_session

    session = active_session(model)
    if session is not None and session.decoder is not None:
        return
    attributes[WARNED_ATTR] = True
    warnings.warn(
        "kvpress-chunk: this context was prefilled under a press with decoding-time compression, but no such "
        "press is applied now: it decodes without compressing (the cache grows past max_cache). Continue it "
        "inside `with press(model):` with that press",
        DecodingOutsideThePressWarning,
        stacklevel=3,
    )


@dataclass
class CacheDecoding:
    """Decoding-time compression state of *one cache*: each layer's observation window (hidden
    states and RoPE of its last tokens), its prompt slots (``protect_prompt``) and the tokens each
    row generated since its last compression.

    Why on the cache: it was per session and per layer, so continuing context A after context B
    was prefilled in the same block scored A with B's window and protected B's prompt width, and a
    context prefilled in an earlier block (or loaded from a file) lost ``protect_prompt``
    silently. On the cache, a copy (deepcopy) continues from its original's state; a cache met for
    the first time while decoding (loaded, an earlier block) counts every slot it holds then as its
    prompt and fills its window from the tokens it decodes."""

    hidden: dict = field(default_factory=dict)  # layer -> hidden states of the last tokens
    hidden_valid: dict = field(default_factory=dict)  # layer -> bool[B, n]: which of them are real (prompt padding)
    rope: dict = field(default_factory=dict)  # layer -> (cos, sin) of the same tokens
    prompt_width: dict = field(default_factory=dict)  # layer -> prompt slots
    since: Any = 0  # int64[B]: tokens generated per row since its last compression

    def remember(
        self, layer_idx: int, hidden: torch.Tensor, rope: Any, window: int, fresh: bool, valid: torch.Tensor | None = None
    ) -> None:
        """Keep the last ``window`` hidden states (and RoPE) of this layer; ``valid[B, n]``: which
        of ``hidden``'s tokens are real (the prefill's padding; every generated token is)."""
        if valid is None:
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if not fresh and layer_idx in self.hidden and self.hidden[layer_idx].shape[0] == hidden.shape[0]:
            # the two are always recorded together (here, and restoring a saved context)
            hidden = torch.cat([self.hidden[layer_idx], hidden], dim=1)
            valid = torch.cat([self.hidden_valid[layer_idx], valid.to(hidden.device)], dim=1)
        self.hidden[layer_idx] = hidden[:, -window:].detach()
        self.hidden_valid[layer_idx] = valid[:, -window:].to(hidden.device)
        if isinstance(rope, tuple) and len(rope) == 2:
            cos, sin = rope
            if not fresh and layer_idx in self.rope and self.rope[layer_idx][0].shape[0] == cos.shape[0]:
                old_cos, old_sin = self.rope[layer_idx]
                cos, sin = torch.cat([old_cos, cos], dim=1), torch.cat([old_sin, sin], dim=1)
            self.rope[layer_idx] = (cos[:, -window:].detach(), sin[:, -window:].detach())
        else:
            self.rope.pop(layer_idx, None)


def decoding_state(cache: Any, fresh: bool = False) -> CacheDecoding:
    """``cache``'s decoding state, created (and attached) when it has none or ``fresh``."""
    state = None if fresh else getattr(cache, "__dict__", {}).get(DECODING_ATTR)
    if state is None:
        state = CacheDecoding()
        try:
            setattr(cache, DECODING_ATTR, state)
        except (AttributeError, TypeError):  # pragma: no cover - a cache class with __slots__
            pass
    return state


class DecodingCompressor:
    """Per-session driver of decoding-time compression (created by the session when the press
    has ``decoding``). :meth:`after_layer` runs after every attention layer's forward; what must
    follow a cache lives on the cache (:class:`CacheDecoding`), only the forward in flight here."""

    def __init__(self, session: "PressSession"):
        self.session = session
        self.press = session.press
        self.policy: Decoding = session.press.decoding
        self.inner = decode_press(session.press)
        self.window = max(1, self.inner.scorer.decode_queries(self.policy.every) or 0)
        self.state: CacheDecoding | None = None  # the state of the cache of the forward in flight
        self.fire: Any = None  # bool[B]: rows compressing in the forward in flight
        self.firing = False  # some row compresses in this forward
        self.earlier: dict[int, Selection] = {}  # selections of the pass in flight (layer reuse)
        self.compressions = 0  # passes run (for tests and reports)
        self.max_seen = 0  # largest per-row token count after any decode forward (for tests)

    # -- the hook ------------------------------------------------------------------------------------

    def after_layer(self, layer_idx: int, module: Any, args: tuple, kwargs: dict) -> None:
        session = self.session
        cache = cache_argument((), kwargs)
        hidden = call_argument(args, kwargs, "hidden_states", 0)
        if cache is None or hidden is None or not hasattr(cache, "layers") or layer_idx >= len(cache.layers):
            return
        if layer_idx in session.skipped_layers or layer_idx not in session.compressible:
            return
        layer = cache.layers[layer_idx]
        rope = kwargs.get("position_embeddings")
        first = layer_idx == session.compressible[0]
        if session.valid_seen:  # a prefill: start afresh (this layer was just compressed, if at all)
            state = decoding_state(cache, fresh=first)
            state.remember(layer_idx, hidden, rope, self.window, fresh=True, valid=session.valid)
            state.prompt_width[layer_idx] = layer.keys.shape[-2]
            if first:
                guard_against_beam_search(cache)
            return
        state = decoding_state(cache)
        if layer_idx not in state.prompt_width:
            # First met while decoding (loaded, prefilled in an earlier block): what it held
            # before this forward is its prompt.
            state.prompt_width[layer_idx] = layer.keys.shape[-2] - hidden.shape[1]
        state.remember(layer_idx, hidden, rope, self.window, fresh=False)
        self.state = state
        router = session.router
        views = router.live_views(cache)
        if views is None:
            views = router.views[cache] = {}
            attach_views(cache, views)
        valid = self._valid(layer.keys.shape[-2], views.get(layer_idx), layer.keys.device, layer.keys.shape[0])
        start = state.prompt_width[layer_idx] if self.policy.protect_prompt else 0
        start = min(start, valid.shape[-1])
        if first:
            # Rows decide alone (a row compresses exactly when it would in a batch of one).
            count = valid[:, start:].sum(dim=-1)
            if not isinstance(state.since, torch.Tensor) or state.since.shape != count.shape:
                state.since = torch.zeros_like(count)
            state.since = state.since + hidden.shape[1]
            m, n = self.policy.max_cache, self.policy.every
            self.fire = (count > m) & ((state.since >= n) | (count >= m + n))
            reading = getattr(cache, "__dict__", {}).get(READING_ATTR)
            if reading is not None:
                self.fire = self.fire & ~reading.to(self.fire.device)
            self.firing = bool(self.fire.any())
            self.earlier = {}
        if not self.firing:
            self.max_seen = max(self.max_seen, int(valid.sum(dim=-1).max()))
            return
        if layer_idx == session.compressible[-1]:
            state.since = torch.where(self.fire, torch.zeros_like(state.since), state.since)
            self.compressions += 1
        self._compress(layer_idx, module, layer, views, valid, start)
        self.max_seen = max(self.max_seen, int(views[layer_idx].visible[:, 0].sum(dim=-1).max()))

    def _visible_heads(self, layer_idx: int, view: Any, valid: torch.Tensor) -> torch.Tensor:
        """``bool[B, Hs, L]``: the real tokens each row and head attends to (mask mode: per-head
        views hide different tokens; :meth:`_valid` is head 0's)."""
        if view is None or view.visible.shape[1] == 1:
            return valid[:, None, :]
        heads = valid[:, None, :].expand(-1, view.visible.shape[1], -1).clone()
        heads[..., : view.prefix_length] = view.visible.to(valid.device)
        return heads

    def _valid(self, length: int, view: Any, device: torch.device, batch: int) -> torch.Tensor:
        """``bool[B, L]``: real tokens of a layer's cache (view prefix + tokens appended since)."""
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        prefix = 0
        if view is not None:
            # Per-head views keep equal counts per head (head-adaptive parts are refused), so their
            # padding slots agree across heads: head 0 says which slots are real.
            prefix = view.prefix_length
            valid[:, :prefix] = view.visible[:, 0].to(device)
        appended = self.session.router.appended_valid(length - prefix) if length > prefix else None
        if appended is not None:
            valid[:, prefix:] = appended.to(device)
        return valid

    def _compress(self, layer_idx, module, layer, views, valid, start: int) -> None:
        from .modes.routing import LayerView

        keys, values = layer.keys, layer.values
        masked = self.press.apply == "mask"
        view = views.get(layer_idx)
        if not masked and view is not None and hides_inner_slots(view.visible):
            # Evict mode reads the cache as left-padded rows; a mask-mode view hides slots in the
            # middle (its groups came out negative: an IndexError deep in the selector).
            raise ValueError(
                "this context was compressed in mask mode (its cache keeps hidden slots): continue it "
                "under a press with apply='mask', or without decoding-time compression"
            )
        if masked:
            # Mask mode: the cache keeps every token, the view hides them. The region's visible
            # tokens are gathered into the layout evict mode holds (per row and head, in order,
            # left-padded to the widest row), so the parts see exactly evict mode's inputs and
            # keep the same tokens; the kept slots then map back to cache positions.
            region = self._visible_heads(layer_idx, views.get(layer_idx), valid)[..., start:]  # [B, Hs, R]
            counts = region.sum(dim=-1, keepdim=True)
            width = int(counts.max())
            order = torch.argsort(region.to(torch.int8), dim=-1, stable=True)[..., region.shape[-1] - width:]
            sub_keys, sub_values = gather_kv(keys[..., start:, :], values[..., start:, :], order)
            sub_valid = (torch.arange(width, device=region.device) >= width - counts)[:, 0]
        else:
            sub_keys, sub_values, sub_valid = keys[..., start:, :], values[..., start:, :], valid[:, start:]
        length = sub_keys.shape[-2]
        inner = self.inner
        source = inner.planner.source_among(layer_idx, self.session.compressible)
        reused = self.earlier.get(source) if source != layer_idx else None
        if reused is not None and reused.length == length:
            kept_keys, kept_values = reused.apply(sub_keys, sub_values)
            selection = reused
        else:
            rope = self.state.rope.get(layer_idx)
            inputs = LayerInputs(
                module=module, layer_idx=layer_idx, hidden_states=self.state.hidden[layer_idx],
                keys=sub_keys, values=sub_values, valid=sub_valid, position_embeddings=rope, input_ids=None,
                query_valid=self.state.hidden_valid[layer_idx],
            )
            compressible = self.session.compressible
            budget = inner.layer_budget(sub_valid, compressible.index(layer_idx), len(compressible))
            cap = self.policy.max_cache
            # Per-layer budgets (pyramid...) are capped at M so that no layer exceeds the bound.
            budget = torch.full_like(self.fire, cap, dtype=torch.int64) if budget is None else budget.clamp(max=cap)
            # Rows that do not compress at this step keep every token.
            budget = torch.where(self.fire.to(budget.device), budget, sub_valid.sum(dim=-1).to(budget.dtype))
            kept_keys, kept_values, selection = inner.select(inputs, budget)
        self.earlier[layer_idx] = selection
        grow_in_place(layer)  # the decoding goes on: no copy of the whole layer per token
        if masked:
            heads = max(order.shape[1], selection.indices.shape[1])
            positions = order.expand(-1, heads, -1).gather(-1, selection.indices.expand(-1, heads, -1).clamp(min=0))
            kept = torch.zeros(*positions.shape[:2], region.shape[-1] + 1, dtype=torch.bool, device=positions.device)
            positions = torch.where(selection.slot_valid.expand(-1, heads, -1), positions, region.shape[-1])
            kept = kept.scatter_(-1, positions, True)[..., :-1]
            before = self._visible_heads(layer_idx, views.get(layer_idx), valid)[..., :start]
            visible = torch.cat([before.expand(-1, heads, -1), kept], dim=-1)
            views[layer_idx] = LayerView.of(visible, flex_block_size=KV_BLOCK_SIZE)
            return
        if start:
            kept_keys = torch.cat([keys[..., :start, :], kept_keys], dim=-2)
            kept_values = torch.cat([values[..., :start, :], kept_values], dim=-2)
            kept = selection.slot_valid.to(valid.device)
            heads = max(kept.shape[1], 1)
            visible = torch.cat([valid[:, None, :start].expand(-1, heads, -1), kept.expand(-1, heads, -1)], dim=-1)
        else:
            visible = selection.slot_valid
        layer.keys, layer.values = kept_keys.contiguous(), kept_values.contiguous()
        views[layer_idx] = LayerView.of(visible)

"""The ``with press(model):`` session: hooks on the model and its attention layers, and the state
of one prefill.

Per attention layer, right after its attention ran at prefill (the layer's full cache exists,
later layers' do not yet)::

    hook -> planner (reuse?) -> allocator budget -> Press.select (compiled op) -> mode.apply -> view

so the whole uncompressed cache is never alive at once. Policies whose allocator needs every
layer's scores (``global``) record scores in the hooks instead, and select and evict once after
the prefill (the whole-cache stage, :mod:`.whole_cache`): the uncompressed cache is then alive
until the end of the prefill. Later forwards attend through the layers' views
(:mod:`.modes.routing`).
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from .decoding import DecodingCompressor
from .hf.hooks import (
    CACHE_ARGUMENT_NAMES,
    CacheNotFoundError,
    UnsupportedModelError,
    cache_argument,
    cache_length,
    call_argument,
    find_attention_layers,
    has_cache_argument,
    padding_mask,
    query_projection,
    remixed_value_heads,
    unevictable_layer,
    windowed_layers,
)
from .context_pass import load_tokenizer_for, run_context_pass
from .hf.growing_layer import grow_in_place
from .modes.routing import attached_views, compressed_attention, routing_cache
from .policies.layer_inputs import LayerInputs
from .selection import Selection
from .registry import SpecError, part_name
from .whole_cache import LayerScores, select_globally

if TYPE_CHECKING:
    from .press import Press


class UncompressedAppendWarning(RuntimeWarning):
    """Tokens appended under a press to a non-empty cache that no press prefilled: not compressed."""


class UncachedForwardWarning(RuntimeWarning):
    """A forward under a press with ``use_cache=False``: nothing is cached, so nothing is compressed."""


PREFILLED_MARK = "_kvpress_chunk_prefilled"


def mark_prefilled(cache: Any) -> None:
    """Record on ``cache`` that a press session prefilled it (or it was loaded from a saved
    context). An instance attribute, so ``copy.deepcopy`` (``CompressedContext.copy``) keeps it."""
    try:
        setattr(cache, PREFILLED_MARK, True)
    except (AttributeError, TypeError):  # pragma: no cover - a cache class with __slots__
        pass


def _forward_inputs(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The token ids of a model forward, or its ``inputs_embeds`` when called with embeddings."""
    inputs = call_argument(args, kwargs, "input_ids", 0)
    return kwargs.get("inputs_embeds") if inputs is None else inputs


class PressAlreadyActiveError(RuntimeError):
    """A press is already applied to this model (hooks would compress twice)."""


_ACTIVE_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, PressSession]" = weakref.WeakKeyDictionary()


def active_session(model: nn.Module) -> "PressSession | None":
    """The session of the press currently applied to ``model``, if any."""
    return _ACTIVE_SESSIONS.get(model)


@dataclasses.dataclass
class _Continuation:
    """What a cache this session compressed stands for: ``logical`` tokens of text (padding
    columns included: the width of the 2-D mask that continues it), and per compressed layer the
    ``offset`` between that and the layer's slots (tokens evicted; 0 in mask mode)."""

    logical: int
    offsets: dict[int, int]
    next_positions: torch.Tensor  # int64[B]: RoPE position of each row's next token


#: instance attribute of a compressed cache: its :class:`_Continuation`. On the cache (not in a
#: table keyed by the object) so that copies and loaded contexts are checked like the original:
#: ``model.generate`` handed a *copy* of a compressed cache was once not refused.
CONTINUATION_ATTR = "_kvpress_chunk_continuation"


def continuation_of(cache: Any) -> "_Continuation | None":
    state = getattr(cache, "__dict__", None)
    return state.get(CONTINUATION_ATTR) if state is not None else None


def forget_compression(cache: Any) -> None:
    """Drop what an earlier prefill of ``cache`` recorded (what it stood for, its outside-the-press
    rule): the cache was emptied and is being prefilled again."""
    state = getattr(cache, "__dict__", None)
    if state is not None:
        state.pop(CONTINUATION_ATTR, None)
        state.pop("_kvpress_chunk_outside", None)


def views_hide_slots(views) -> bool:
    """Whether a view hides a slot (mask mode's evicted tokens, ragged heads' padding slots):
    attention is then right only through the press's routing."""
    return any(not bool(view.visible.all()) for view in views.values())


def record_compressed(cache: Any, logical: int, next_positions: torch.Tensor, layers, padded: bool, hidden: bool) -> None:
    """Remember what a compressed cache stands for (``logical`` tokens of text, each compressed
    layer's offset to its slots, the rows' next positions) and guard it against continuations
    outside the press: refused when rows are padded or views hide slots (never right without
    routing), warned about when tokens were evicted (right only with the caller's positions).
    Used after a prefill or continuation under a press and by ``load_context``."""
    offsets = {}
    for layer_idx in layers:
        keys = getattr(cache.layers[layer_idx], "keys", None) if layer_idx < len(cache.layers) else None
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            offsets[layer_idx] = logical - keys.shape[-2]
    try:
        setattr(cache, CONTINUATION_ATTR, _Continuation(logical, offsets, next_positions))
    except (AttributeError, TypeError):  # pragma: no cover - a cache class with __slots__
        pass
    if padded or hidden:
        guard_outside_the_press(cache, refuse=True)
    elif any(offset > 0 for offset in offsets.values()):
        guard_outside_the_press(cache, refuse=False)
    # (a keep-all press on unpadded rows leaves a cache that plain HF continues right)


class ContinuationError(ValueError):
    """A forward met a compressed cache in coordinates that do not follow it (see :meth:`PressSession._check_continuation`)."""


OUTSIDE_MESSAGE = (
    "this cache was compressed by kvpress-chunk and is being extended outside the press: without the press "
    "the model would give its new tokens positions after the *compressed* length and attend to padding and "
    "hidden slots, which answers wrongly without an error. Continue it inside `with press(model):` (e.g. "
    "`model.generate` there) or with kvpress_chunk.greedy_continue on the CompressedContext."
)
OUTSIDE_HINT = "Safer: continue it inside `with press(model):` or with kvpress_chunk.greedy_continue."
_GUARDED: dict[type, type] = {}


def guard_outside_the_press(cache: Any, refuse: bool) -> None:
    """Watch ``cache.update`` for forwards outside any press or compressed-context routing (a
    compressed cache continued by a plain ``model.generate`` after the ``with`` block).

    ``refuse``: raise :class:`ContinuationError` (padded rows or mask-mode views: never right
    without the press); otherwise warn once (an unpadded evicted cache is right only if the
    caller passes ``position_ids`` continuing the original text, which ``update`` cannot see).
    Done by switching the instance to a subclass of its own class rather than by an instance
    attribute: ``copy.deepcopy`` (``CompressedContext.copy``) keeps the class, so copies stay
    guarded, and a bound-method attribute would have pointed the copy at the original's tensors."""
    # Never relaxed: a cache once refused stays refused (a later continuation forward, whose own
    # call is unpadded, must not turn a padded cache's refusal into a warning).
    current = cache.__dict__.get("_kvpress_chunk_outside")
    if refuse or current not in ("refuse", "warned"):
        cache._kvpress_chunk_outside = "refuse" if refuse else "warn"
    cls = type(cache)
    if getattr(cls, "_kvpress_chunk_guarded", False) or not hasattr(cls, "update"):
        return
    guarded = _GUARDED.get(cls)
    if guarded is None:
        def update(self, *args, **kwargs):
            if not routing_cache(self):
                rule = self.__dict__.get("_kvpress_chunk_outside")
                if rule == "refuse":
                    raise ContinuationError(OUTSIDE_MESSAGE)
                if rule == "warn":
                    self._kvpress_chunk_outside = "warned"
                    warnings.warn("kvpress-chunk: a compressed cache is being extended outside the press; this is "
                                  "right only with position_ids continuing the original text. " + OUTSIDE_HINT,
                                  RuntimeWarning, stacklevel=2)
            return cls.update(self, *args, **kwargs)

        guarded = type(cls.__name__, (cls,), {"update": update, "_kvpress_chunk_guarded": True,
                                              "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _GUARDED[cls] = guarded
    cache.__class__ = guarded


class PressSession:
    """Mutable state of one ``with press(model):`` block.

    * ``valid``: the padding mask of the prefill in flight (from the model's ``attention_mask``);
    * ``selections``: ``layer_idx -> Selection`` of the last prefill (reused by planners, and
      inspectable: kept indices, Jaccard overlap between layers...);
    * ``skipped_layers``: layers left alone (sliding-window layers).
    """

    def __init__(self, press: "Press", model: nn.Module, tokenizer: Any = None):
        self.press = press
        self.model = model
        self.tokenizer = tokenizer
        if press.scorer.context_pass and tokenizer is None:
            self.tokenizer = load_tokenizer_for(model)
            if self.tokenizer is None:
                raise SpecError(
                    f"scorer {part_name(press.scorer)!r} runs the model over a prompt after the prefill, so it needs "
                    "the model's tokenizer: `with press(model, tokenizer=tokenizer):` (none was found at "
                    f"config.name_or_path={getattr(model.config, 'name_or_path', None)!r})"
                )
        self.layers = find_attention_layers(model)
        remixed = remixed_value_heads(self.layers) if press.selector.per_head and press.apply == "evict" else None
        if remixed is not None:
            raise UnsupportedModelError(
                f"{remixed} mixes value heads across KV heads (differential attention), so per-head eviction would "
                "pair each head's keys with other tokens' values: use apply='mask' or a shared selection (per_head=False)"
            )
        self.valid: torch.Tensor | None = None
        self.input_ids: torch.Tensor | None = None  # tokens of the prefill in flight
        self.selections: dict[int, Selection] = {}
        self.skipped_layers: set[int] = set()
        self.valid_seen = False  # the forward in flight is a prefill this session handles
        self.warned_length = False
        self.warned_append = False
        self.warned_uncached = False
        self.router = None  # the model's CompressedAttention while attached
        self.depth = 0  # nesting of the model's / base model's forwards in flight
        self.views: dict = {}  # layer_idx -> LayerView of the last prefill (also held by the router)
        # Layers the allocator counts (sliding-window layers are never compressed): rank -> budget.
        # Decided from the model, not from the cache a caller hands over (``windowed_layers``).
        self.windowed = windowed_layers(model, self.layers)
        self.compressible = [idx for idx, _ in self.layers if idx not in self.windowed]
        if press.whole_cache:
            self._check_groups_for_one_ranking()
        # Deferred layers (whole-cache stage, context pass): held until the prefill's forward ends.
        self.pending_scores: dict[int, LayerScores] = {}
        self.pending_layers: dict[int, tuple[Any, int, LayerInputs]] = {}
        self.pending_cache: Any = None
        self.prefill_cache: Any = None  # the cache of the prefill in flight
        self.prefill_length = 0
        self.prefill_positions: torch.Tensor | None = None
        # What a compressed cache stands for lives on the cache (``continuation_of``), so copies,
        # loaded contexts and later blocks are checked like the original.
        self.continuing: tuple[Any, int, torch.Tensor] | None = None  # (cache, logical, positions) after the forward in flight
        # Decoding-time compression (issue 12, kvpress_chunk/decoding.py), when the press asks for it.
        self.decoder = DecodingCompressor(self) if press.decoding is not None else None
        # layer_idx -> the query projection's output of the forward in flight (scorers that read
        # every query, Scorer.reads_queries); taken by that layer's attention hook right after.
        self.projected_queries: dict[int, torch.Tensor] = {}
        self.attended: set[int] | None = None  # layers whose attention ran in the forward in flight

    def _check_groups_for_one_ranking(self) -> None:
        """Refuse a whole-cache allocator (one top-k over every layer) with a planner whose groups
        of layers sharing a selection differ in size on this model.

        Why: only each group's first layer is ranked, and its kept tokens then count once per
        layer of its group; with unequal groups the total is not the press's (tiny Llama, 5
        layers, chunkkv-global with reuse every 2: 906 tokens kept instead of 1000, no error).
        Equal groups keep the total exactly."""
        groups: dict[int, int] = {}
        for idx in self.compressible:
            source = self.press.planner.source_among(idx, self.compressible)
            groups[source] = groups.get(source, 0) + 1
        if len(set(groups.values())) > 1:
            raise SpecError(
                f"allocator {part_name(self.press.allocator)!r} ranks every layer's tokens at once, but on this "
                f"{type(self.model).__name__} the planner's groups of layers sharing a selection differ in size "
                f"({sorted(groups.values(), reverse=True)} layers): a shared selection counts once per layer of its group, "
                "so the cache would not keep the press's total. Use a planner whose groups divide the "
                f"{len(self.compressible)} compressed layers, or planner 'every_layer'"
            )

    @contextmanager
    def attached(self) -> Iterator["PressSession"]:
        if self.model in _ACTIVE_SESSIONS:
            raise PressAlreadyActiveError(
                f"a press is already applied to this {type(self.model).__name__}; "
                "exit the first `with press(model):` block before entering another"
            )
        handles = []
        guard = None
        _ACTIVE_SESSIONS[self.model] = self
        try:
            check = getattr(self.press.scorer, "check_module", None)  # refuse a model the scorer cannot score
            for layer_idx, module in self.layers:
                if check is not None and layer_idx in self.compressible:
                    check(module)
            with compressed_attention(self.model) as router:
                self.router = router
                handles.append(self.model.register_forward_pre_hook(self._enter, prepend=True))
                handles.append(self.model.register_forward_pre_hook(self._before_outer, with_kwargs=True))
                handles.append(self.model.register_forward_hook(self._after_outer, always_call=True))
                base = getattr(self.model, "base_model", None)
                if isinstance(base, nn.Module) and base is not self.model:
                    # `model.model(...)` (no LM head) skips the hooks above: the same ones, routing
                    # included, run on the base model when it is called on its own.
                    handles.append(base.register_forward_pre_hook(self._before_base, with_kwargs=True))
                    handles.append(base.register_forward_hook(self._after_base, always_call=True))
                first_layer = self.layers[0][0]
                for layer_idx, module in self.layers:
                    hook = self._make_attention_hook(layer_idx, is_first=layer_idx == first_layer)
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
                    projection = query_projection(module) if self.press.scorer.reads_queries else None
                    if projection is not None:
                        handles.append(projection.register_forward_hook(self._make_query_capture(layer_idx)))
                guard = self._guard_chunked_prefill()
                yield self
        finally:
            if guard is not None and self.model.__dict__.get("_prefill") is guard:
                del self.model.__dict__["_prefill"]
            for handle in handles:
                handle.remove()
            self.router = None
            _ACTIVE_SESSIONS.pop(self.model, None)

    def _guard_chunked_prefill(self):
        """Shadow ``model._prefill`` (transformers' generate prefill) for the block: a chunked
        prefill (``generate(..., prefill_chunk_size=n)``) runs the prompt as several forwards, of
        which only the first starts from an empty cache, so the press would compress the first
        chunk alone and append the rest uncompressed. Refused while the prompt needs more than one
        chunk. ``None`` when this transformers release has no ``_prefill``."""
        original = getattr(type(self.model), "_prefill", None)
        if original is None or "_prefill" in vars(self.model):
            return None
        model = self.model

        def _prefill(input_ids, generation_config=None, *args, **kwargs):
            chunk = getattr(generation_config, "prefill_chunk_size", None)
            if chunk and isinstance(input_ids, torch.Tensor) and input_ids.shape[-1] > chunk:
                raise ValueError(
                    f"generate(prefill_chunk_size={chunk}) splits this {input_ids.shape[-1]}-token prompt into chunks: "
                    "the press compresses a prefill from an empty cache, so it would compress the first chunk only "
                    "and append the others uncompressed. Drop prefill_chunk_size under a press (or make it at "
                    "least the prompt length)."
                )
            return original(model, input_ids, generation_config, *args, **kwargs)

        model.__dict__["_prefill"] = _prefill
        return _prefill

    # Outermost forward only: the model's forward calls its base model, the context pass calls the
    # base model from inside the model's after-hook; those nested calls are part of the outer one.
    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.depth += 1

    def _before_outer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.depth == 1:
            self._before_model(module, args, kwargs)

    def _after_outer(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            if self.depth == 1:
                self._after_model(module, args, output)
        finally:
            self.depth = max(0, self.depth - 1)

    def _before_base(self, module: nn.Module, args: tuple, kwargs: dict):
        self.depth += 1
        if self.depth != 1:
            return None
        changed = self.router._before_forward(module, args, kwargs)  # what the model's router hook does
        if changed is not None:
            args, kwargs = changed
        self._before_model(module, args, kwargs)
        return changed

    def _after_base(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            if self.depth == 1:
                try:
                    self._after_model(module, args, output)
                finally:
                    self.router._after_forward(module, args, output)
        finally:
            self.depth = max(0, self.depth - 1)

    # Model-level hooks: capture the padding mask of a prefill (attention layers never see it in
    # 2-D form) and forget it afterwards so that it cannot leak into a later call.
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.attended = set()
        self.valid = self.input_ids = None
        self.continuing = None
        cache = cache_argument(args, kwargs, position=3)
        unsupported = unevictable_layer(cache, self.compressible)
        if unsupported is not None:
            raise TypeError(
                f"a press cannot compress a {type(cache).__name__} ({unsupported} layers: preallocated or quantized "
                "tensors are not evicted in place, so the press would compress nothing or corrupt it): use a "
                "DynamicCache (the default; drop cache_implementation='static'/'quantized' from generate)"
            )
        if cache_length(cache) > 0:
            self._check_continuation(cache, args, kwargs)
            self._warn_if_appending_uncompressed(cache, args, kwargs)
            return
        inputs = _forward_inputs(args, kwargs)
        if inputs is None:
            return
        mask = call_argument(args, kwargs, "attention_mask", 1)
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            # The press reads each row's padding from a 2-D mask only; a custom 4-D mask's padding
            # was taken for real tokens (scored, kept and attended to when decoding): refuse it.
            raise ValueError(
                f"a press needs a 2-D attention_mask [batch, length] (left padding) on the prefill, got a "
                f"{mask.dim()}-D mask: pass the 2-D padding mask (and no custom 4-D mask) under a press"
            )
        self.valid = padding_mask(mask, inputs.shape[1])
        self._warn_if_longer_than_the_model(inputs.shape[1])
        self.input_ids = inputs if not inputs.is_floating_point() else None

    def _warn_if_longer_than_the_model(self, length: int) -> None:
        """RoPE models run past their trained length without an error, answering worse: say so once."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and length > limit and not self.warned_length:
            self.warned_length = True
            warnings.warn(
                f"kvpress-chunk: this prompt has {length} tokens, more than the {limit} positions "
                f"{type(self.model).__name__} was configured for: expect degraded answers (with or without a press)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn_if_appending_uncompressed(self, cache: Any, args: tuple, kwargs: dict) -> None:
        """Warn once when several tokens are appended to a cache no press prefilled (a system
        prompt cached without the press, ``generate(past_key_values=prefix_cache)``): only a
        prefill from an empty cache is compressed, so the answers are right but nothing is saved.
        A question after a compressed (or keep-all) context is not warned about: that cache
        carries the mark of its prefill, copies and saved contexts included."""
        if self.warned_append or getattr(cache, PREFILLED_MARK, False) or continuation_of(cache) is not None:
            return
        inputs = _forward_inputs(args, kwargs)
        added = inputs.shape[1] if inputs is not None else 0
        if added < 2:
            return  # one token at a time: decoding, which a prefill press never compresses
        self.warned_append = True
        warnings.warn(
            f"kvpress-chunk: {added} tokens are appended under the press to a cache that already holds "
            f"{cache_length(cache)} tokens it did not prefill: a press compresses a prefill from an empty cache "
            "only, so these tokens stay uncompressed (answers are right, no memory is saved). Prefill the whole "
            "prompt under the press (a cached prefix included).",
            UncompressedAppendWarning,
            stacklevel=4,
        )

    def _check_continuation(self, cache: Any, args: tuple, kwargs: dict) -> None:
        """Refuse a forward on a cache this session compressed unless it continues it: its 2-D mask
        (when given) must cover the text the cache stands for plus the new tokens, and no compressed
        layer may have changed length since the last forward. ``model.generate`` handed such a
        cache (it slices the prompt at ``cache.get_seq_length()``, the *compressed* length),
        assisted / prompt-lookup decoding and ``DynamicCache.crop`` (cuts in slot coordinates) all
        break that, and would otherwise run on wrong keys and positions without an error."""
        state = continuation_of(cache)
        if state is None:
            return
        inputs = _forward_inputs(args, kwargs)
        added = inputs.shape[1] if inputs is not None else 0
        mask = call_argument(args, kwargs, "attention_mask", 1)
        before = mask.shape[-1] - added if isinstance(mask, torch.Tensor) and mask.dim() == 2 else state.logical
        problem = None
        positions = call_argument(args, kwargs, "position_ids", 2)
        if isinstance(positions, torch.Tensor) and positions.dim() == 2 and added and positions.shape[-1] == added:
            # Without a 2-D mask (transformers 5.2x generate passes none when nothing is padded) the
            # positions are what tell: they must continue from the original text.
            first = positions[:, 0].to(state.next_positions.device)
            if not bool((first == state.next_positions).all()):
                problem = (
                    f"its new tokens start at position(s) {sorted(set(first.tolist()))}, the text it stands for "
                    f"ends before {sorted(set(state.next_positions.tolist()))}"
                )
        for layer_idx, offset in state.offsets.items():
            slots = cache.layers[layer_idx].keys.shape[-2]
            if problem is None and (slots + offset != before or (before != state.logical and offset != 0)):
                problem = (
                    f"layer {layer_idx} holds {slots} slots for {slots + offset} tokens of text, but the call's "
                    f"attention mask puts its {added} new token(s) after {before}"
                )
        if problem is not None:
            raise ContinuationError(
                f"this forward does not continue the compressed cache: {problem}. A compressed cache can only "
                "be extended by the tokens that follow it: `model.generate` given a cache that was already "
                "compressed (it cuts the prompt at the compressed length), assisted or prompt-lookup generation "
                "and DynamicCache.crop (which cut in slot coordinates) would run on the wrong tokens. Generate "
                "from the prompt under the press, or continue with kvpress_chunk.greedy_continue on a "
                "CompressedContext (docs/decoding.md)."
            )
        self.continuing = (cache, before + added, state.next_positions + added)

    def _record_continuation(self, output: Any) -> None:
        """After a forward: remember what a freshly compressed (or continued) cache stands for."""
        if output is None:
            return
        if self.valid_seen and self.prefill_cache is not None and self.views:
            cache, logical, positions = self.prefill_cache, self.prefill_length, self.prefill_positions
        elif self.continuing is not None:
            cache, logical, positions = self.continuing
        else:
            return
        state = continuation_of(cache)
        layers = list(self.views) if state is None else list(state.offsets)
        padded = self.valid is not None and not bool(self.valid.all())
        views = attached_views(cache)
        record_compressed(cache, logical, positions, layers, padded, views_hide_slots(self.views if views is None else views))

    def _after_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.attended = None  # the context pass (KVzip) runs the layers again, on purpose
        try:
            if self.pending_layers and output is not None:
                self._finish_deferred()
            self._record_continuation(output)
        finally:
            self.pending_scores.clear()
            self.pending_layers.clear()
            self.pending_cache = None
            self.prefill_cache = None
            self.continuing = None
        if self.valid_seen and not self.selections and self.skipped_layers:
            warnings.warn(
                f"kvpress-chunk: no layer was compressed: all {len(self.skipped_layers)} attention layers of this "
                f"{type(self.model).__name__} are sliding-window layers, which bound their own memory",
                RuntimeWarning,
                stacklevel=2,
            )
        self.valid = self.input_ids = None
        self.valid_seen = False

    def _make_attention_hook(self, layer_idx: int, is_first: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._refuse_a_second_call(layer_idx, module)
            self._compress_layer(layer_idx, module, args, kwargs, is_first)
            if self.decoder is not None:  # decoding-time compression
                self.decoder.after_layer(layer_idx, module, args, kwargs)

        return hook

    def _refuse_a_second_call(self, layer_idx: int, module: nn.Module) -> None:
        """A layer's attention runs once per forward in every model a press supports. Looped
        models (HRM: each layer runs H_cycles x (L_cycles + 1) times) would have the press score
        the first call's inputs while later calls read and rewrite the cache: selections for other
        hidden states than the ones cached (window attention off by ~1.0, no error)."""
        if self.attended is None:
            return
        if layer_idx in self.attended:
            raise UnsupportedModelError(
                f"{type(module).__name__} (layer {layer_idx}) ran more than once in one forward of "
                f"{type(self.model).__name__} (a looped or weight-shared model): a press scores and evicts a layer "
                "once per forward, so it cannot compress this model"
            )
        self.attended.add(layer_idx)

    def _make_query_capture(self, layer_idx: int):
        def capture(projection: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self.projected_queries[layer_idx] = output  # a reference: the forward made it anyway

        return capture

    def _compress_layer(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict, is_first: bool) -> None:
        projected = self.projected_queries.pop(layer_idx, None)  # taken on every call: never kept past its layer
        cache = cache_argument((), kwargs)
        hidden = call_argument(args, kwargs, "hidden_states", 0)
        if cache is None:
            if has_cache_argument(kwargs):
                # use_cache=False: nothing is cached, so nothing to compress. Said once: under
                # generate(use_cache=False) every step reruns the whole text, so the answers were
                # the full model's while they read as the press's (tiny Llama, snapkv at 80%
                # removed: generate's tokens equal to the run without a press, no word).
                if is_first and not self.warned_uncached:
                    self.warned_uncached = True
                    warnings.warn(
                        "kvpress-chunk: a forward under the press with use_cache=False: nothing is cached, so nothing is "
                        "compressed (generate(use_cache=False) answers as the model without the press). Leave use_cache "
                        "on to compress",
                        UncachedForwardWarning,
                        stacklevel=2,
                    )
                return
            raise CacheNotFoundError(
                f"attention layer {layer_idx} ({type(module).__name__}) was called without a cache argument "
                f"under any known name ({', '.join(CACHE_ARGUMENT_NAMES)}); got keyword arguments "
                f"{sorted(kwargs)}. This transformers version passes the cache differently: please report it. "
                "Refusing to run uncompressed silently."
            )
        if hidden is None or not hasattr(cache, "layers") or layer_idx >= len(cache.layers):
            raise CacheNotFoundError(
                f"cannot compress layer {layer_idx}: the cache ({type(cache).__name__}) has no layer list "
                "with keys/values (use a transformers DynamicCache)"
            )
        layer = cache.layers[layer_idx]
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            raise TypeError(
                f"cannot compress cache layer {type(layer).__name__}: expected `.keys`/`.values` tensors "
                "[B, H, T, D] (use a DynamicCache; quantized and static caches are not supported)"
            )
        length = keys.shape[-2]
        sliding = getattr(layer, "is_sliding", False)
        seen = getattr(layer, "cumulative_length", length) if sliding else length
        if hidden.shape[1] != seen:
            return  # not a prefill from an empty cache: decoding or a follow-up question
        if is_first:
            self._check_windowed_cache(cache, layer_idx)
            self.valid_seen = True  # a prefill from an empty cache is under way
            self.selections.clear()
            self.skipped_layers.clear()
            self.views = self.router.start_prefill(cache)
            self.prefill_cache, self.prefill_length = cache, hidden.shape[1]
            mark_prefilled(cache)
            forget_compression(cache)  # a cache emptied and prefilled again starts afresh
            self.prefill_positions = (
                self.valid.sum(dim=-1).to(torch.int64).cpu() if self.valid is not None
                else torch.full((hidden.shape[0],), hidden.shape[1], dtype=torch.int64)
            )
        if sliding or layer_idx in self.windowed:
            # A sliding-window layer already bounds its memory; its own length bookkeeping
            # (cumulative_length) would disagree with an evicted cache. A layer the model windows
            # in a cache built full-length is left alone too: routing it through a view would
            # replace the model's window mask by full attention.
            self.skipped_layers.add(layer_idx)
            return
        valid = self.valid
        if valid is None:
            valid = torch.ones(keys.shape[0], length, dtype=torch.bool, device=keys.device)
        else:
            valid = valid.to(keys.device)
        inputs = LayerInputs(
            module=module,
            layer_idx=layer_idx,
            hidden_states=hidden,
            keys=keys,
            values=values,
            valid=valid,
            position_embeddings=kwargs.get("position_embeddings"),
            input_ids=self.input_ids.to(keys.device) if self.input_ids is not None and self.input_ids.shape[-1] == length else None,
            projected_queries=projected,  # query_states checks its shape before using it
        )
        if self.press.deferred:
            self._defer_layer(layer_idx, layer, inputs, cache)
            return
        self._select_and_apply(layer_idx, layer, inputs)

    def _check_windowed_cache(self, cache: Any, first_layer: int) -> None:
        """Refuse a cache whose layers are all full-length for a model with sliding-window layers
        when the model's first layer is compressed.

        Why: with no sliding layer in the cache (``DynamicCache()`` without ``config=``),
        transformers sizes the sliding layers' masks from the cache's first layer; once that
        layer is compressed the masks no longer fit the full-length sliding layers (a shape
        error deep in the attention at best). Gemma 2/3, whose first layer slides, are fine: the
        windowed layers are left alone (``windowed_layers``) and their masks are sized from one."""
        if not self.windowed or first_layer not in self.compressible:
            return
        if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", [])):
            return
        raise ValueError(
            f"layers {sorted(self.windowed)} of this {type(self.model).__name__} attend over a sliding window, but "
            f"the cache ({type(cache).__name__}) keeps every layer full-length (built without config=, or "
            "cache_implementation='dynamic_full'): transformers would size those layers' masks from the compressed "
            "first layer. Build it with DynamicCache(config=model.config) (what model.generate and "
            "kvpress_chunk.new_cache do)"
        )

    def _select_and_apply(self, layer_idx: int, layer: Any, inputs: LayerInputs) -> None:
        """Planner, allocator budget, fused op, apply mode: one layer compressed now."""
        rank = self.compressible.index(layer_idx) if layer_idx in self.compressible else 0
        budget = self.press.layer_budget(inputs.valid, rank, len(self.compressible))
        kept_keys, kept_values, selection = self.press.compress_layer(inputs, self.selections, self.compressible, budget)
        self._apply(layer_idx, layer, selection, kept_keys, kept_values)

    def _apply(self, layer_idx: int, layer: Any, selection: Selection, kept_keys, kept_values) -> None:
        """The apply mode, then the layer grows in place while decoding (no copy of the whole
        layer per token: :mod:`.hf.growing_layer`)."""
        self.selections[layer_idx] = selection
        self.views[layer_idx] = self.press.mode.apply(layer, selection, kept_keys, kept_values)
        grow_in_place(layer)

    def _defer_layer(self, layer_idx: int, layer: Any, inputs: LayerInputs, cache: Any) -> None:
        """Hold a layer until the prefill ends: score it now (whole-cache stage) unless its scores
        come from the context pass; keep what selecting it later needs (not its hidden states, only
        the trailing ones its scorer asks for: ``Scorer.deferred_hidden``)."""
        source = self.press.planner.source_among(layer_idx, self.compressible)
        if source == layer_idx or source not in self.pending_layers:
            source = layer_idx
            if self.press.whole_cache and not self.press.scorer.context_pass:
                self.pending_scores[layer_idx] = self._layer_scores(inputs)
        if self.press.scorer.context_pass and self.input_ids is None:
            raise ValueError(
                f"the {type(self.press.scorer).__name__} reconstructs the prompt from its token ids: "
                "call the model with input_ids, not inputs_embeds"
            )
        length = inputs.hidden_states.shape[1]
        tail = min(length, self.press.scorer.deferred_hidden())
        light = dataclasses.replace(inputs, hidden_states=inputs.hidden_states[:, length - tail :], projected_queries=None)
        self.pending_layers[layer_idx] = (layer, source, light)
        self.pending_cache = cache

    def _layer_scores(self, inputs: LayerInputs) -> LayerScores:
        """One layer's scores for the whole-cache stage. A context not longer than the observation
        window is kept whole by :func:`select_globally` without looking at scores (the in-hook path
        does the same), and scoring it is not defined (no key lies before the window): zeros."""
        batch, heads, length, _ = inputs.keys.shape
        if length <= self.press.scorer.window:
            pools = heads if self.press.selector.per_head else 1
            return LayerScores(torch.zeros(batch, pools, length, device=inputs.keys.device), inputs.valid, {})
        return LayerScores(self.press.score_layer(inputs), inputs.valid, self.press.grouper.prepare(inputs))

    def _finish_deferred(self) -> None:
        """After the prefill: the context pass (if the scorer has one), then either one selection
        over every layer (whole-cache stage) or layer by layer, and each layer is evicted once."""
        sources = {idx: item for idx, item in sorted(self.pending_layers.items()) if item[1] == idx}
        if self.press.scorer.context_pass:
            first = next(iter(sources.values()))[2]
            modules = [(idx, item[2].module) for idx, item in sources.items()]
            scores = run_context_pass(
                self.model, self.press.scorer, self.tokenizer, self.pending_cache,
                first.input_ids if first.input_ids is not None else self.input_ids, first.valid, modules,
            )
            for idx, (layer, source, inputs) in sources.items():
                inputs = dataclasses.replace(inputs, context_scores=scores[idx])
                self.pending_layers[idx] = (layer, source, inputs)
                if self.press.whole_cache:
                    self.pending_scores[idx] = self._layer_scores(inputs)
        if not self.press.whole_cache:
            for layer_idx, (layer, _, inputs) in sorted(self.pending_layers.items()):
                self._select_and_apply(layer_idx, layer, inputs)  # in order: reused sources come first
            return
        chosen = select_globally(self.press, self.pending_scores)
        for layer_idx, (layer, source, _) in sorted(self.pending_layers.items()):
            selection = chosen[source]
            kept_keys, kept_values = selection.apply(layer.keys, layer.values)
            self._apply(layer_idx, layer, selection, kept_keys, kept_values)

"""Attention of compressed layers, routed through their own masks (both apply modes).

Why this exists: after compression a full-attention layer's cache holds ``P`` slots (evict mode:
the kept tokens, left-padded per row; mask mode: the whole prefill, partly hidden), while the
2-D attention mask that callers pass describes the *original* text: that is what
``model.generate``, pipelines, sliding-window layers (Gemma 2/3, Mistral) and RoPE positions
need. One 2-D mask cannot describe both, so the model keeps the original (logical) mask and each
compressed layer attends through its :class:`LayerView` instead:

* slots ``[0, P)``: the layer's prefix, visible where ``LayerView.visible[B, Hs, P]`` says
  (``Hs`` = 1 when all heads share a selection, one row per KV head otherwise);
* slots ``[P, kv)``: tokens added after compression, visible under the causal rule where the
  last ``kv - P`` columns of the forward's 2-D mask say (they are the same tokens in both
  coordinates).

Layers that were not compressed (sliding-window layers, other models) keep the model's own mask.

:class:`CompressedAttention` installs this for one model: an attention implementation registered
with transformers' ``AttentionInterface`` that delegates to the model's own (``sdpa`` or
``eager``) with the substituted mask, plus a forward pre-hook that records the 2-D mask of the
call in flight. Views are kept per cache object, on the cache itself (``attached_views``), so a
context copied, loaded from a file or continued in a later block is routed from its own views and
never meets another prefill's masks.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..hf.hooks import (
    UnsupportedModelError,
    cache_argument,
    cache_length,
    call_argument,
    find_attention_layers,
    takes_argument,
)
from .block_masks import PrefixBlocks, dense_prefix_mask
from .flex import flex_decode_step
from .gathered import PrefixSlots, decode_kernel

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class LayerView:
    """How later queries see one compressed layer's cache prefix.

    ``visible[B, Hs, P]``: which of the ``P`` prefix slots a row (and head) attends to.
    ``flex_block_size``: decode single queries through a FlexAttention BlockMask (mask mode).
    ``all_visible``: every slot visible and shared by all heads (batch 1 evict, no padding):
    the model's own mask is then already right and is used unchanged (no dense mask to build).
    """

    visible: torch.Tensor
    flex_block_size: int | None = None
    all_visible: bool = False
    # Block tables for flex decoding, built on first use and kept for the view's lifetime (the
    # selection does not change while decoding): query heads -> PrefixBlocks, "slots" -> PrefixSlots.
    _blocks: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, visible: torch.Tensor, flex_block_size: int | None = None) -> "LayerView":
        visible = visible.to(torch.bool)
        every = visible.shape[1] == 1 and flex_block_size is None and bool(visible.all())
        return cls(visible, flex_block_size, every)

    @property
    def prefix_length(self) -> int:
        return self.visible.shape[-1]

    def prefix_blocks(self, query_heads: int) -> PrefixBlocks:
        """The flex block tables of this prefix (mask mode), built once per view."""
        blocks = self._blocks.get(query_heads)
        if blocks is None:
            blocks = self._blocks[query_heads] = PrefixBlocks(self.visible, query_heads, self.flex_block_size)
        return blocks

    def prefix_slots(self) -> PrefixSlots:
        """The kept prefix slots as index lists (mask mode's gathered decoding), built once per view."""
        slots = self._blocks.get("slots")
        if slots is None:
            slots = self._blocks["slots"] = PrefixSlots(self.visible)
        return slots

    def kept_per_row(self) -> torch.Tensor:
        """Prefix tokens each row attends to (mean over heads for per-head views)."""
        return self.visible.sum(dim=-1).to(torch.float32).mean(dim=1).round().to(torch.int64)


Views = dict[int, LayerView]

# attention module -> (router, layer index) while a router is installed on its model
_ROUTES: "weakref.WeakKeyDictionary[nn.Module, tuple[CompressedAttention, int]]" = weakref.WeakKeyDictionary()
# model -> its installed router
_ROUTERS: "weakref.WeakKeyDictionary[nn.Module, CompressedAttention]" = weakref.WeakKeyDictionary()
_REGISTERED: set[str] = set()
# attention module -> what computes its attention instead during the context pass (see
# context_pass.run_context_pass): ``(query, key, value, kwargs) -> output | None`` (None: the
# model's own attention runs)
PASS_ATTENTION: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


#: instance attribute of a compressed cache: its live view table (``layer_idx -> LayerView``)
VIEWS_ATTR = "_kvpress_chunk_views"


def attached_views(cache: Any) -> "Views | None":
    """The view table a compressed cache carries, or None.

    Why on the cache: a copy (``CompressedContext.copy``, ``copy.deepcopy``), a context loaded
    from a file or continued in a later press block is routed from its own views. Kept only in
    the router, they were found for the original object alone, and the copy was continued with
    plain attention over its padding and hidden slots (wrong logits, no error)."""
    state = getattr(cache, "__dict__", None)
    return state.get(VIEWS_ATTR) if state is not None else None


def attach_views(cache: Any, views: "Views") -> None:
    try:
        setattr(cache, VIEWS_ATTR, views)
    except (AttributeError, TypeError):  # pragma: no cover - a cache class with __slots__
        pass


def routing_active() -> bool:
    """Whether any model of this process routes attention through compressed views right now
    (inside a press block, or a compressed context's continuation)."""
    return bool(_ROUTERS)


def routing_cache(cache: Any) -> bool:
    """Whether the forward in flight on ``cache`` is routed: a router installed on the model
    running it (inside its press block, or a compressed context's continuation) saw this very
    cache. Not "any router anywhere": another model's press block does not route this cache, and
    counting it let a compressed cache grow outside its own press unrefused."""
    return any(router.forwarding is cache for router in list(_ROUTERS.values()))


def router_of(model: nn.Module) -> "CompressedAttention | None":
    """The router installed on ``model``, if any."""
    return _ROUTERS.get(model)


class CompressedAttention:
    """Per-model routing state: views per cache, and the 2-D mask of the forward in flight."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.views: "weakref.WeakKeyDictionary[Any, Views]" = weakref.WeakKeyDictionary()
        self.active: Views | None = None
        self.forwarding: Any = None  # the cache of the forward in flight (``routing_cache``)
        self.forward_mask: torch.Tensor | None = None
        self.trailing_valid = 0  # trailing columns of forward_mask that are real in every row
        self.shadowed: Any = None  # the cache whose get_seq_length the forward in flight shadows
        self._depth = 0
        self._handles: list = []
        self._saved_implementation: str | None = None

    # -- installation -----------------------------------------------------------------------------

    def _install(self) -> None:
        model = self.model
        if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
            raise UnsupportedModelError(
                f"a press needs a transformers PreTrainedModel (AttentionInterface); got {type(model).__name__}"
            )
        current = model.config._attn_implementation
        if current not in SUPPORTED_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"a press supports attn_implementation 'sdpa' or 'eager', the model uses {current!r}: "
                "load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
            )
        layers = find_attention_layers(model)
        name = register_routed_attention(current)
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            # transformers only warns when a model's attention classes were fixed at build time
            # (DiffLlama, Nemotron on 5.2); its compressed layers would read their caches through
            # the model's own masks: wrong for padded rows and mask mode, without an error.
            raise UnsupportedModelError(
                f"{type(model).__name__} does not take an attention implementation after it is built (its "
                "attention does not dispatch through transformers' AttentionInterface on this release), so a "
                "press cannot read its compressed caches correctly; newer transformers releases may support it"
            )
        self._saved_implementation = current
        self.takes_cache_position = takes_argument(model, "cache_position")
        self._handles.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_forward, always_call=True))
        for layer_idx, module in layers:
            _ROUTES[module] = (self, layer_idx)
        for module, source_idx in kv_reading_layers(model, layers).items():
            _ROUTES[module] = (self, source_idx)
        _ROUTERS[model] = self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in [m for m, (router, _) in list(_ROUTES.items()) if router is self]:
            _ROUTES.pop(module, None)
        _ROUTERS.pop(self.model, None)
        if self._saved_implementation is not None:
            self.model.set_attn_implementation(self._saved_implementation)
        self.active = self.forward_mask = None

    # -- views --------------------------------------------------------------------------------------

    def start_prefill(self, cache: Any) -> Views:
        """A fresh, empty view table for ``cache`` (called when its prefill begins compressing)."""
        fresh: Views = {}
        self.views[cache] = fresh
        attach_views(cache, fresh)
        return fresh

    def live_views(self, cache: Any) -> Views | None:
        """The view table ``cache`` is routed through: the router's, else the one it carries."""
        if cache is None:
            return None
        views = self.views.get(cache)
        return views if views is not None else attached_views(cache)

    def views_of(self, cache: Any) -> Views:
        return dict(self.live_views(cache) or {})

    @contextlib.contextmanager
    def using(self, cache: Any, views: Mapping[int, LayerView]) -> Iterator[None]:
        """Route ``cache``'s compressed layers through ``views`` for the block (e.g. a copied context)."""
        if cache in self.views or (not views and attached_views(cache) is None):
            yield
            return
        # The cache's own table when it has one: it follows decoding-time compression, a
        # snapshot taken at prefill would not.
        carried = attached_views(cache)
        self.views[cache] = carried if carried is not None else dict(views)
        try:
            yield
        finally:
            self.views.pop(cache, None)

    # -- forward hooks --------------------------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        cache = cache_argument(args, kwargs, position=3)
        self.forwarding = cache
        views = self.live_views(cache) if cache is not None and cache_length(cache) > 0 else None
        self.active = views or None
        self.routed_layers: set[int] = set()
        mask = call_argument(args, kwargs, "attention_mask", 1)
        self.forward_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.trailing_valid = 0
        if self.active is None:
            return
        position_ids = call_argument(args, kwargs, "position_ids", 2)
        if position_ids is None:
            raise ValueError(
                "this cache was compressed, so it is shorter than the text it stands for: pass position_ids "
                "continuing from the original length (model.generate, kvpress_chunk.greedy_continue and "
                "generate_answers do it for you)"
            )
        if self.forward_mask is not None:
            real = self.forward_mask.to(torch.bool)
            self.trailing_valid = int(real.all(dim=0).flip(-1).to(torch.int64).cumprod(-1).sum())
        inputs = call_argument(args, kwargs, "input_ids", 0)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            return None
        start = self._original_positions(inputs, position_ids)
        if self.takes_cache_position:
            # transformers < 5.3 derives cache_position from cache.get_seq_length(), which a
            # compressed first layer makes too small; sliding-window layers build their masks
            # from it.
            if kwargs.get("cache_position") is None:
                kwargs["cache_position"] = start
                return args, kwargs
        elif 0 in self.active and not hasattr(cache, "get_query_offset"):
            # transformers 5.3 to the release that added Cache.get_query_offset place every
            # mask's queries at cache.get_seq_length(), the *first* layer's length: when that
            # layer was compressed, the uncompressed sliding-window layers got masks for queries
            # at the wrong positions (a padded Qwen2 row with full layers below sliding ones
            # answered other tokens on 5.12). For the forward, the first layer reports the
            # original length, as every uncompressed layer does.
            self.shadowed = cache
            cache.get_seq_length = _first_layer_reports(cache, int(start[0]))
        return None

    def _original_positions(self, inputs: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the forward's tokens in the original text's coordinates: the 2-D mask's
        width (it covers the whole text), else the positions (one row: unpadded)."""
        length = inputs.shape[1]
        if self.forward_mask is not None:
            width = self.forward_mask.shape[-1]
            return torch.arange(width - length, width, device=inputs.device)
        return position_ids.reshape(-1, position_ids.shape[-1])[0].to(inputs.device)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.shadowed is not None:
            self.shadowed.__dict__.pop("get_seq_length", None)
        # ``output`` is None when the forward raised (a refusal before any layer ran): nothing to check
        unrouted = sorted(set(self.active or ()) - self.routed_layers) if output is not None else []
        self.active = self.forward_mask = self.forwarding = self.shadowed = None
        if unrouted:
            # Checked after the fact because only the forward shows it: a model whose attention
            # does not dispatch through transformers' AttentionInterface (DiffLlama, Nemotron on
            # 5.2: their attention classes are fixed when the model is built) ignores
            # set_attn_implementation, so its compressed layers ran with the model's own mask
            # (padded rows and mask mode silently wrong).
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: compressed layers {unrouted} did not attend through transformers' "
                "AttentionInterface, so their compressed caches cannot be read correctly; this model (on this "
                "transformers release) is not supported by a press"
            )

    @property
    def forward_mask_full(self) -> bool:
        """No padding anywhere in the forward's 2-D mask (or no mask): the model's own mask is right
        for a layer whose slots are all visible."""
        return self.forward_mask is None or self.trailing_valid >= self.forward_mask.shape[-1]

    def appended_valid(self, count: int) -> torch.Tensor | None:
        """Validity of the last ``count`` tokens of the forward (``None``: all real)."""
        if self.forward_mask is None or count <= self.trailing_valid:
            return None
        if self.forward_mask.shape[-1] < count:
            raise ValueError(
                f"the attention mask covers {self.forward_mask.shape[-1]} tokens, fewer than the {count} added "
                "after compression: pass the mask of the whole text (original prefix + every token since)"
            )
        return self.forward_mask[:, -count:].to(torch.bool)


@contextlib.contextmanager
def compressed_attention(model: nn.Module) -> Iterator[CompressedAttention]:
    """Install (or reuse, re-entrantly) the router on ``model`` for the duration of the block."""
    router = _ROUTERS.get(model)
    if router is None:
        router = CompressedAttention(model)
        router._install()
    router._depth += 1
    try:
        yield router
    finally:
        router._depth -= 1
        if router._depth == 0:
            router._remove()


def kv_reading_layers(model: nn.Module, layers: list[tuple[int, nn.Module]]) -> dict[nn.Module, int]:
    """Attention modules that attend over another layer's keys and values -> that layer's index.

    Gemma 3n's KV-shared layers (``config.num_kv_shared_layers``; transformers >= 5.3) have no
    key projection of their own and read the keys of the last "store" layer of their type. When
    that layer is compressed, they must see its cache through its view: with the model's own
    mask a padded row read other rows' slot layout (off by 1.57 in the logits) and mask mode
    attended to the hidden tokens.
    """
    producers = {getattr(m, "layer_type", None): idx for idx, m in layers if getattr(m, "store_full_length_kv", False)}
    readers: dict[nn.Module, int] = {}
    for module in model.modules():
        if getattr(module, "is_kv_shared_layer", False) is not True:
            continue
        layer_type = getattr(module, "layer_type", None)
        if layer_type not in producers:
            raise UnsupportedModelError(
                f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) reuses another layer's keys, "
                "but no layer of its type stores them: this KV-sharing layout is not supported by a press"
            )
        readers[module] = producers[layer_type]
    return readers


def _first_layer_reports(cache: Any, original_length: int):
    """``cache.get_seq_length`` for one forward: the first layer answers ``original_length``
    (the text's length before this forward), every other layer its own length."""
    own = type(cache).get_seq_length

    def get_seq_length(layer_idx: int = 0) -> int:
        return original_length if layer_idx == 0 else own(cache, layer_idx)

    return get_seq_length


def _delegate(implementation: str, module: nn.Module):
    if implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    family = sys.modules.get(type(module).__module__)
    eager = getattr(family, "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    return eager


#: keyword arguments of an attention call that the mask-mode decode kernels (flex, gathered slots)
#: honour or that do not change the result: anything else (GPT-OSS's ``s_aux`` sink logits, a
#: ``softcap``, a ``sliding_window``, dropout in train mode) makes the call go to the model's own
#: attention with a dense mask
PLAIN_ATTENTION_KWARGS = frozenset({
    "scaling", "position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
    "output_router_logits", "is_causal",
})


def no_positional_extras(args: tuple) -> bool:
    """Whether the positional arguments after the attention mask carry nothing: none, or only a
    zero dropout. Why the dropout: transformers passes it by keyword, but a wrapper of the
    registered attention functions may pass it by position (NVIDIA kvpress wraps every function
    registered when it is imported, ours included, as ``(..., attention_mask, dropout, **kwargs)``).
    Read as an unknown argument, it sent every mask-mode decode step of a process that had run
    kvpress to the dense path and KVzip's pass off its fused attention: right, but silently slow."""
    return not args or (len(args) == 1 and isinstance(args[0], (int, float)) and not args[0])


def plain_attention(args: tuple, kwargs: dict) -> bool:
    """Whether an attention call is plain scaled softmax attention, which the mask-mode decode
    kernels compute. Why: they take only the query, keys, values and scale; GPT-OSS's learned
    sink logits (``s_aux``) were dropped by them, so mask mode decoded with other logits than
    evict mode (0.65 apart on a tiny GPT-OSS, no error)."""
    if not no_positional_extras(args):
        return False
    for name, value in kwargs.items():
        if name in PLAIN_ATTENTION_KWARGS or value is None:
            continue
        if name == "dropout" and not value:
            continue
        return False
    return True


try:  # transformers' collector of returned attention weights (5.2 and 5.25 have it)
    from transformers.utils.output_capturing import _active_collector as _WEIGHTS_COLLECTOR
except ImportError:  # pragma: no cover - a release without it
    _WEIGHTS_COLLECTOR = None


def attention_weights_wanted(implementation: str, kwargs: dict) -> bool:
    """Whether this attention call must return its weights: an eager model asked for
    ``output_attentions`` (as a keyword, or by the forward in flight, whose collector gathers each
    module's returned weights and skips a ``None``). Why it matters: the mask-mode decode kernels
    return no weights, so an eager model's decode steps reported fewer layers' attentions (Gemma 3:
    its two compressed layers were left out, and entry 1 of the tuple was layer 2's weights, no
    error). ``True`` for eager models when this transformers release's collector cannot be read:
    the dense path is right either way, only slower."""
    if implementation != "eager":
        return False
    if kwargs.get("output_attentions") or _WEIGHTS_COLLECTOR is None:
        return True
    collected = _WEIGHTS_COLLECTOR.get()
    return isinstance(collected, dict) and "attentions" in collected


def _make_routed_attention(implementation: str):
    def routed_attention(module, query, key, value, attention_mask, *args, **kwargs):
        override = PASS_ATTENTION.get(module)
        if override is not None and no_positional_extras(args):
            output = override(query, key, value, kwargs)
            if output is not None:
                return output, None
        delegate = _delegate(implementation, module)
        router, layer_idx = _ROUTES.get(module, (None, -1))
        view = router.active.get(layer_idx) if router is not None and router.active else None
        if view is not None:
            router.routed_layers.add(layer_idx)
        if view is None or key.shape[2] < view.prefix_length:
            return delegate(module, query, key, value, attention_mask, *args, **kwargs)
        appended = router.appended_valid(key.shape[2] - view.prefix_length)
        q_length = query.shape[2]
        own_mask_fits = attention_mask is None or attention_mask.shape[-1] == key.shape[2]
        if view.all_visible and router.forward_mask_full and q_length == 1 and own_mask_fits:
            # One query, every slot real and visible: the model's own mask is right. (Not for
            # several queries: transformers < 5.3 places them by cache_position, which is in
            # original coordinates, so its causal rule would let them see each other. Not for a
            # mask sized for another layer: 5.14+ sizes it from the first cache layer when the
            # cache was built without config=, a full-length sliding layer on Gemma 2/3.)
            return delegate(module, query, key, value, attention_mask, *args, **kwargs)
        if (view.flex_block_size is not None and q_length == 1 and appended is None and plain_attention(args, kwargs)
                and not attention_weights_wanted(implementation, kwargs)):
            scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
            if decode_kernel(query.device) == "gather":
                out = view.prefix_slots().attend(query, key, value, scale)
            else:
                out = flex_decode_step(query, key, value, view.prefix_blocks(query.shape[1]), scale)
            if out is not None:
                return out.transpose(1, 2).contiguous(), None
        allowed = dense_prefix_mask(view.visible, query.shape[1], q_length, key.shape[2], appended)
        if implementation == "eager":
            allowed = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~allowed, torch.finfo(query.dtype).min
            )
        return delegate(module, query, key, value, allowed, *args, **kwargs)

    routed_attention.__name__ = f"kvpress_chunk_{implementation}"
    return routed_attention


def register_routed_attention(implementation: str) -> str:
    """Register the routed twin of ``implementation`` with transformers (idempotent); its name."""
    name = f"kvpress_chunk_{implementation}"
    if name not in _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

        AttentionInterface.register(name, _make_routed_attention(implementation))
        AttentionMaskInterface.register(name, eager_mask if implementation == "eager" else sdpa_mask)
        _REGISTERED.add(name)
    return name

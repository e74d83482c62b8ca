"""Press: a complete compression policy (parts + budget), and the context manager that applies it.

Data flow at prefill, per attention layer::

    forward hook -> planner(layer) -> [scorer -> grouper -> selector] (compiled)  -> evict -> cache
                                   \\-> reuse an earlier layer's Selection ------/

The :class:`Press` is immutable configuration; everything that changes during a forward lives in
a :class:`PressSession`, created by ``with press(model) as session:`` and dropped on exit.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .budget import Budget
from .compile.ops import compiled_compress, eager_compress
from .hf.hooks import (
    CACHE_ARGUMENT_NAMES,
    CacheNotFoundError,
    cache_argument,
    cache_length,
    call_argument,
    find_attention_layers,
    has_cache_argument,
    padding_mask,
)
from .modes import get_mode, mode_names
from .modes.routing import compressed_attention
from .policies.groupers import Grouper
from .policies.layer_inputs import LayerInputs
from .policies.planners import Planner
from .policies.scorers import Scorer
from .policies.selectors import Selector
from .registry import PART_KINDS, SpecError, build_part, describe_part
from .selection import Selection

PART_BASES: dict[str, type] = {"scorer": Scorer, "grouper": Grouper, "selector": Selector, "planner": Planner}
PRESS_KEYS = ("compression_ratio", "budget", "compile", "apply")


class PressAlreadyActiveError(RuntimeError):
    """A press is already applied to this model (hooks would compress twice)."""


@dataclass(frozen=True)
class Press:
    """A compression policy. Build one with :func:`make_press`; apply it with ``with press(model):``.

    Exactly one of ``compression_ratio`` (fraction of tokens removed) and ``budget`` (tokens kept
    per row) is set; see :mod:`kvpress_chunk.budget` for the exact counting rule. ``compile``
    runs the fused score/group/select/gather op through ``torch.compile`` (set it to ``False``
    to skip the first-call compile cost, e.g. for a single short run).

    ``apply`` says what happens to the selection: ``"evict"`` gathers the kept tokens into a
    smaller cache (saves memory, fastest decoding); ``"mask"`` keeps the cache whole and makes
    later forwards attend through a FlexAttention BlockMask of the selection (no copy, per-head
    selections of any shape, quick A/B of policies). In mask mode, decode inside the
    ``with press(model):`` block: the masks live as long as the block.
    """

    scorer: Scorer
    grouper: Grouper
    selector: Selector
    planner: Planner
    compression_ratio: float | None = None
    budget: int | None = None
    compile: bool = True
    apply: str = "evict"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        mode = get_mode(self.apply)  # raises SpecError naming the valid modes
        for kind, base in PART_BASES.items():
            part = getattr(self, kind)
            if not isinstance(part, base):
                raise SpecError(f"{kind} must be a {base.__name__}, got {type(part).__name__}")
        self.rule  # validates the budget settings
        # Capabilities declared by the parts, checked in this one place.
        if self.selector.ragged_heads and not mode.holds_ragged_heads:
            holders = [name for name in mode_names() if get_mode(name).holds_ragged_heads]
            raise SpecError(
                f"the {describe_part(self.selector).split('(')[0]} selector keeps different token counts per head, "
                f"which apply={self.apply!r} cannot hold: use apply={holders[0]!r}"
            )
        if self.selector.needs_ratio and self.budget is not None:
            raise SpecError("a selector with count='groups' needs compression_ratio, not budget")

    @property
    def mode(self):
        """The :class:`~kvpress_chunk.modes.ApplyMode` named by :attr:`apply`."""
        return get_mode(self.apply)

    @property
    def rule(self) -> Budget:
        return Budget(self.compression_ratio, self.budget)

    def describe(self) -> str:
        parts = ", ".join(f"{kind}={describe_part(getattr(self, kind))}" for kind in PART_KINDS)
        return f"{self.name}: {parts}, {self.rule.describe()}, apply={self.apply}"

    def replace(self, **changes: Any) -> "Press":
        """A copy with some fields changed (e.g. another ratio: ``press.replace(compression_ratio=0.5)``).

        Setting one budget form clears the other."""
        if "compression_ratio" in changes and "budget" not in changes:
            changes["budget"] = None
        if "budget" in changes and "compression_ratio" not in changes:
            changes["compression_ratio"] = None
        return dataclasses.replace(self, **changes)

    # -- the per-layer op -------------------------------------------------------------------------

    def compress_fn(self):
        """The fused op for this policy, compiled or eager per :attr:`compile`."""
        maker = compiled_compress if self.compile else eager_compress
        return maker(self.scorer, self.grouper, self.selector, self.rule.kind)

    def select(self, inputs: LayerInputs) -> tuple[torch.Tensor, torch.Tensor, Selection]:
        """Compress one layer: ``(kept_keys, kept_values, selection)``.

        Usable without hooks (benchmarks, tests, custom caches). Layers that cannot lose a
        token (window not exceeded, budget >= length) are returned as they are, without a copy.
        """
        keys, values = inputs.keys, inputs.values
        batch, _, length, _ = keys.shape
        rule, window = self.rule, self.scorer.window
        if rule.is_noop or length <= window or rule.kept(length) >= length:
            return keys, values, Selection.everything(batch, length, keys.device, inputs.valid)
        capacity = self.selector.capacity(
            length, window, rule, self.grouper.max_group_size, self.grouper.num_groups(length)
        )
        extra = self.scorer.prepare(inputs)
        kept_keys, kept_values, indices, slot_valid = self.compress_fn()(
            keys, values, inputs.valid, extra, capacity, rule.value_tensor(keys.device)
        )
        selection = Selection(indices, slot_valid, length)
        trimmed = selection.trimmed()
        if trimmed is not selection:
            width = trimmed.indices.shape[-1]
            kept_keys = kept_keys[..., -width:, :].contiguous()
            kept_values = kept_values[..., -width:, :].contiguous()
        return kept_keys, kept_values, trimmed

    def compress_layer(
        self, inputs: LayerInputs, earlier: Mapping[int, Selection]
    ) -> tuple[torch.Tensor, torch.Tensor, Selection]:
        """Planner, then select: apply the source layer's selection when the planner names another
        layer that was already compressed (``earlier``: layer -> Selection of this prefill), else
        score and select afresh. What the hooks do per layer, usable without them (benchmarks)."""
        source = self.planner.source_layer(inputs.layer_idx)
        reused = earlier.get(source) if source != inputs.layer_idx else None
        if reused is None:
            return self.select(inputs)
        kept_keys, kept_values = reused.apply(inputs.keys, inputs.values)
        return kept_keys, kept_values, reused

    # -- the context manager ----------------------------------------------------------------------

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator["PressSession"]:
        """Hook ``model`` so that every prefill is compressed; the hooks go when the block exits
        (exceptions included). Yields the :class:`PressSession` (selections of the last prefill)."""
        session = PressSession(self, model)
        with session.attached():
            yield session


_ACTIVE_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, PressSession]" = weakref.WeakKeyDictionary()


def active_session(model: nn.Module) -> "PressSession | None":
    """The session of the press currently applied to ``model``, if any."""
    return _ACTIVE_SESSIONS.get(model)


class PressSession:
    """Mutable state of one ``with press(model):`` block.

    * ``valid``: the padding mask of the prefill in flight (from the model's ``attention_mask``);
    * ``selections``: ``layer_idx -> Selection`` of the last prefill (reused by planners, and
      inspectable: kept indices, Jaccard overlap between layers...);
    * ``skipped_layers``: layers left alone (sliding-window layers).
    """

    def __init__(self, press: Press, model: nn.Module):
        self.press = press
        self.model = model
        self.layers = find_attention_layers(model)
        self.valid: torch.Tensor | None = None
        self.selections: dict[int, Selection] = {}
        self.skipped_layers: set[int] = set()
        self.prefill_length: int | None = None
        self.prefill_valid: torch.Tensor | None = None
        self.valid_seen = False  # the forward in flight is a prefill this session handles
        self.router = None  # the model's CompressedAttention while attached
        self.views: dict = {}  # layer_idx -> LayerView of the last prefill (also held by the router)

    @contextmanager
    def attached(self) -> Iterator["PressSession"]:
        if self.model in _ACTIVE_SESSIONS:
            raise PressAlreadyActiveError(
                f"a press is already applied to this {type(self.model).__name__}; "
                "exit the first `with press(model):` block before entering another"
            )
        handles = []
        _ACTIVE_SESSIONS[self.model] = self
        try:
            with compressed_attention(self.model) as router:
                self.router = router
                handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
                handles.append(self.model.register_forward_hook(self._after_model, always_call=True))
                first_layer = self.layers[0][0]
                for layer_idx, module in self.layers:
                    hook = self._make_attention_hook(layer_idx, is_first=layer_idx == first_layer)
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self.router = None
            _ACTIVE_SESSIONS.pop(self.model, None)

    # Model-level hooks: capture the padding mask of a prefill (attention layers never see it in
    # 2-D form) and forget it afterwards so that it cannot leak into a later call.
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.valid = None
        if cache_length(cache_argument(args, kwargs, position=3)) > 0:
            return
        inputs = call_argument(args, kwargs, "input_ids", 0)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            return
        self.valid = padding_mask(call_argument(args, kwargs, "attention_mask", 1), inputs.shape[1])

    def _after_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.valid_seen and not self.selections and self.skipped_layers:
            warnings.warn(
                f"kvpress-chunk: no layer was compressed: all {len(self.skipped_layers)} attention layers of this "
                f"{type(self.model).__name__} are sliding-window layers, which bound their own memory",
                RuntimeWarning,
                stacklevel=2,
            )
        self.valid = None
        self.valid_seen = False

    def _make_attention_hook(self, layer_idx: int, is_first: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._compress_layer(layer_idx, module, args, kwargs, is_first)

        return hook

    def _compress_layer(self, layer_idx: int, module: nn.Module, args: tuple, kwargs: dict, is_first: bool) -> None:
        cache = cache_argument((), kwargs)
        hidden = call_argument(args, kwargs, "hidden_states", 0)
        if cache is None:
            if has_cache_argument(kwargs):
                return  # use_cache=False: nothing is cached, so nothing to compress
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
            self.valid_seen = True  # a prefill from an empty cache is under way
            self.selections.clear()
            self.skipped_layers.clear()
            self.prefill_length = hidden.shape[1]
            self.prefill_valid = self.valid
            self.views = self.router.start_prefill(cache)
        if sliding:
            # A sliding-window layer already bounds its memory; its own length bookkeeping
            # (cumulative_length) would disagree with an evicted cache.
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
        )
        kept_keys, kept_values, selection = self.press.compress_layer(inputs, self.selections)
        self.selections[layer_idx] = selection
        self.views[layer_idx] = self.press.mode.apply(layer, selection, kept_keys, kept_values)


def load_spec_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a press spec from a TOML file (top-level keys as in the dict form)."""
    import tomllib

    with open(path, "rb") as handle:
        return tomllib.load(handle)


def make_press(spec: Any = "chunkkv", **overrides: Any) -> Press:
    """Build a :class:`Press` from a preset name, a spec dict, a ``"name(k=v)"`` string or a TOML file.

    >>> make_press("chunkkv", compression_ratio=0.75)
    >>> make_press("chunkkv(chunk_size=20, reuse_every=2)", budget=256)
    >>> make_press({"scorer": {"name": "snapkv", "window": 32}, "grouper": "chunk(size=10)",
    ...             "selector": "topk", "planner": {"name": "reuse", "every": 2},
    ...             "compression_ratio": 0.75})
    >>> make_press("my_policy.toml")

    Keyword arguments override the spec: ``compression_ratio``, ``budget`` and ``compile`` apply
    to the press; other keywords are preset parameters (for a preset) or rejected.
    """
    from .policies.presets import preset_spec

    if isinstance(spec, Press):
        press_changes = {k: overrides.pop(k) for k in list(overrides) if k in PRESS_KEYS}
        if overrides:
            raise SpecError(f"unknown press setting(s) {sorted(overrides)}; valid: {', '.join(PRESS_KEYS)}")
        return spec.replace(**press_changes) if press_changes else spec
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".toml"):
        if not Path(spec).is_file():
            raise SpecError(f"press spec file {str(spec)!r} does not exist")
        spec = load_spec_file(spec)
    name = "custom"
    if isinstance(spec, str):
        preset_params = {k: v for k, v in overrides.items() if k not in PRESS_KEYS}
        overrides = {k: v for k, v in overrides.items() if k in PRESS_KEYS}
        name, spec = preset_spec(spec, preset_params)
    if not isinstance(spec, dict):
        raise SpecError(f"a press spec must be a preset name, a dict or a .toml path, got {type(spec).__name__}")
    spec = dict(spec)
    if "preset" in spec:
        preset = spec.pop("preset")
        params = spec.pop("params", {})
        name, base = preset_spec(preset, params)
        base.update(spec)
        spec = base
    unknown_overrides = sorted(set(overrides) - set(PRESS_KEYS))
    if unknown_overrides:
        raise SpecError(
            f"unknown press setting(s) {unknown_overrides}; valid: {', '.join(PRESS_KEYS)} "
            "(preset parameters are accepted only with a preset name)"
        )
    spec.update(overrides)
    if "compression_ratio" in overrides or "budget" in overrides:
        # An explicit override replaces the spec's budget form instead of clashing with it.
        for key in ("compression_ratio", "budget"):
            if key not in overrides:
                spec.pop(key, None)
    allowed = set(PART_KINDS) | set(PRESS_KEYS) | {"name"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpecError(f"unknown press spec key(s) {unknown}; valid keys: {', '.join(sorted(allowed))}")
    defaults = {"grouper": "token", "selector": "topk", "planner": "every_layer"}
    if "scorer" not in spec:
        raise SpecError("a press spec needs a 'scorer' (e.g. 'snapkv', 'knorm'); see list_presets() for ready ones")
    parts = {kind: build_part(kind, spec.get(kind, defaults.get(kind)), PART_BASES[kind]) for kind in PART_KINDS}
    if "compression_ratio" not in spec and "budget" not in spec:
        raise SpecError("give exactly one of compression_ratio (fraction removed, in [0, 1)) or budget (tokens kept)")
    try:
        return Press(
            **parts,
            compression_ratio=spec.get("compression_ratio"),
            budget=spec.get("budget"),
            compile=spec.get("compile", True),
            apply=spec.get("apply", "evict"),
            name=spec.get("name", name),
        )
    except ValueError as exc:
        raise SpecError(str(exc)) from None

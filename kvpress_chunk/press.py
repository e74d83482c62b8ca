"""Press: a complete compression policy (parts + budget + apply mode) and its per-layer execution.

Data flow at prefill, per attention layer (the hooks live in :mod:`.session`)::

    forward hook -> planner(layer) -> [scorer -> grouper -> selector] (compiled) -> mode.apply -> cache
                      |          allocator: this layer's budget /            (modes/: evict | mask)
                      \\-> reuse an earlier layer's Selection -----------------/

Allocators that need every layer's scores (``global``) select in the whole-cache stage after the
prefill instead (:meth:`Press.score_layer` in the hooks, :func:`.whole_cache.select_globally`).

The :class:`Press` is immutable configuration; everything that changes during a forward lives in
a :class:`~.session.PressSession`, created by ``with press(model) as session:``. Specs (dict,
string, TOML) are parsed in :mod:`.spec`.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .budget import Budget
from .compile.ops import compiled_compress, eager_compress
from .decoding import Decoding, check_press as check_decoding
from .modes import ApplyMode, get_mode, mode_names
from .policies.allocators import Allocator, UniformAllocator
from .policies.groupers import Grouper
from .policies.layer_inputs import LayerInputs
from .policies.planners import Planner
from .policies.scorers import Scorer
from .policies.selectors import Selector
from .registry import PART_KINDS, SpecError, build_part, describe_part, part_name
from .selection import Selection
from .session import PressSession

PART_BASES: dict[str, type] = {
    "scorer": Scorer, "grouper": Grouper, "selector": Selector, "allocator": Allocator, "planner": Planner,
}
PRESS_KEYS = ("compression_ratio", "budget", "compile", "apply", "decoding")


@dataclass(frozen=True)
class Press:
    """A compression policy. Build one with :func:`make_press`; apply it with ``with press(model):``.

    Exactly one of ``compression_ratio`` (fraction of tokens removed) and ``budget`` (tokens kept
    per row) is set; see :mod:`kvpress_chunk.budget` for the exact counting rule. ``compile``
    runs the fused score/group/select/gather op through ``torch.compile``: ``True``, ``False``,
    or ``"auto"`` (default): compiled on accelerators, eager on CPU. Measured on a 2-core CPU
    with SmolLM2: the compiled op shaves ~4% off a 1k-token prefill and nothing visible at 4k,
    while its first call costs 5-25 s per process (47 s seen on a busy machine).

    ``apply`` names the :mod:`~kvpress_chunk.modes` strategy: ``"evict"`` gathers the kept tokens
    into a smaller cache (saves memory, fastest decoding); ``"mask"`` keeps the cache whole and
    makes later forwards attend through a FlexAttention BlockMask of the selection (no copy, quick
    A/B of policies). ``allocator`` spreads the budget over layers and heads (uniform by default).
    """

    scorer: Scorer
    grouper: Grouper
    selector: Selector
    planner: Planner
    allocator: Allocator = field(default_factory=UniformAllocator)
    compression_ratio: float | None = None
    budget: int | None = None
    compile: bool | str = "auto"
    apply: str = "evict"
    name: str = field(default="custom", compare=False)
    decoding: Any = None  # decoding-time compression (issue 12): a .decoding.Decoding, or None

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoding", Decoding.parse(self.decoding))  # decoding: dict -> Decoding
        mode = get_mode(self.apply)  # raises SpecError naming the valid modes
        if self.compile not in (True, False, "auto"):
            raise SpecError(f"compile must be True, False or 'auto', got {self.compile!r}")
        for kind, base in PART_BASES.items():
            part = getattr(self, kind)
            if not isinstance(part, base):
                raise SpecError(f"{kind} must be a {base.__name__}, got {type(part).__name__}")
        self.rule  # validates the budget settings
        # Capabilities declared by the parts, checked in this one place.
        ragged = self.selector.ragged_heads or self.allocator.pools_heads
        if self.allocator.pools_heads and not self.selector.per_head:
            raise SpecError(
                f"the {part_name(self.allocator)} allocator shares budgets across heads, so the selector must score "
                "heads separately: use selector 'topk(per_head=True)'"
            )
        if self.allocator.pools_heads and getattr(self.selector, "count", "tokens") != "tokens":
            raise SpecError(f"the {part_name(self.allocator)} allocator counts tokens: use a selector with count='tokens'")
        if self.allocator.sets_layer_budgets and self.selector.needs_ratio:
            raise SpecError(f"the {part_name(self.allocator)} allocator sets token budgets per layer: use count='tokens'")
        if self.allocator.sets_layer_budgets and self.planner.shares_selections:
            # A layer that applies another's selection keeps that layer's budget, not its own: the
            # pyramid's reusing layers kept their leader's larger share, over the allocator's total.
            raise SpecError(
                f"the {part_name(self.allocator)} allocator gives each layer its own budget, but the {part_name(self.planner)} "
                "planner has layers apply another layer's selection (and so its budget): the cache would keep more "
                "than the allocator's total. Use planner 'every_layer' with it, or a uniform / adaptive allocator"
            )
        if ragged and not mode.holds_ragged_heads:
            holders = [name for name in mode_names() if get_mode(name).holds_ragged_heads]
            culprit = f"{part_name(self.selector)} selector" if self.selector.ragged_heads else f"{part_name(self.allocator)} allocator"
            raise SpecError(
                f"the {culprit} keeps different token counts per head, "
                f"which apply={self.apply!r} cannot hold: use apply={holders[0]!r}"
            )
        if self.selector.needs_ratio and self.budget is not None:
            raise SpecError("a selector with count='groups' needs compression_ratio, not budget")
        check_decoding(self)  # decoding-time compression limits

    @property
    def mode(self) -> ApplyMode:
        """The :class:`~kvpress_chunk.modes.ApplyMode` named by :attr:`apply`."""
        return get_mode(self.apply)

    @property
    def whole_cache(self) -> bool:
        """Whether selection waits for every layer's scores (the whole-cache stage after prefill)."""
        return self.allocator.whole_cache

    @property
    def deferred(self) -> bool:
        """Whether layers are selected after the prefill's forward rather than in their hooks: the
        global allocator needs every layer's scores, a context-pass scorer (KVzip) runs the model
        again first. The uncompressed cache then lives until the forward ends."""
        return self.allocator.whole_cache or self.scorer.context_pass

    @property
    def rule(self) -> Budget:
        return Budget(self.compression_ratio, self.budget)

    def describe(self) -> str:
        parts = ", ".join(f"{kind}={describe_part(getattr(self, kind))}" for kind in PART_KINDS)
        decoding = f", {self.decoding.describe()}" if self.decoding is not None else ""  # decoding
        return f"{self.name}: {parts}, {self.rule.describe()}, apply={self.apply}{decoding}"

    def to_spec(self) -> dict[str, Any]:
        """A plain dict (JSON/TOML-able) from which :func:`~kvpress_chunk.make_press` rebuilds an
        equal press: every part as ``{"name": ..., setting: value}``."""
        spec: dict[str, Any] = {kind: part_spec(getattr(self, kind)) for kind in PART_KINDS}
        if self.compression_ratio is not None:
            spec["compression_ratio"] = self.compression_ratio
        else:
            spec["budget"] = self.budget
        spec.update(compile=self.compile, apply=self.apply, name=self.name)
        if self.decoding is not None:  # decoding
            spec["decoding"] = self.decoding.to_spec()
        return spec

    def replace(self, **changes: Any) -> "Press":
        """A copy with some fields changed (e.g. another ratio: ``press.replace(compression_ratio=0.5)``).

        Setting one budget form clears the other."""
        if "compression_ratio" in changes and "budget" not in changes:
            changes["budget"] = None
        if "budget" in changes and "compression_ratio" not in changes:
            changes["compression_ratio"] = None
        return dataclasses.replace(self, **changes)

    # -- the per-layer op -------------------------------------------------------------------------

    def compiles_on(self, device: torch.device | str) -> bool:
        """Whether the fused op runs compiled for tensors on ``device`` (see :attr:`compile`)."""
        if self.compile == "auto":
            return torch.device(device).type != "cpu"
        return bool(self.compile)

    def compress_fn(self, budget_kind: str | None = None, device: torch.device | str = "cpu"):
        """The fused op for this policy, compiled or eager per :attr:`compile`."""
        maker = compiled_compress if self.compiles_on(device) else eager_compress
        allocator = self.allocator
        return maker(self.scorer, self.grouper, self.selector, budget_kind or self.rule.kind, allocator.pools_heads,
                     allocator.pool_floor)

    def layer_budget(self, valid: torch.Tensor, rank: int, layers: int) -> torch.Tensor | None:
        """Per-row token budget of the ``rank``-th of ``layers`` compressed layers (``int64[B]``),
        or ``None`` when the allocator keeps the press rule unchanged (uniform)."""
        if not self.allocator.sets_layer_budgets:
            return None
        rule, protected = self.rule, self.selector.protected_count(self.scorer.window)
        budgets = []
        for length in valid.sum(dim=-1).tolist():
            kept = max(rule.kept(length), min(protected, length))
            budgets.append(self.allocator.layer_budget(kept, protected, length, rank, layers))
        return torch.tensor(budgets, dtype=torch.int64, device=valid.device)

    def select(
        self, inputs: LayerInputs, layer_budget: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Selection]:
        """Compress one layer: ``(kept_keys, kept_values, selection)``.

        ``layer_budget[B]`` (from :meth:`layer_budget`) replaces the press rule for this layer.
        Usable without hooks (benchmarks, tests, custom caches). Layers that cannot lose a token
        (window not exceeded, budget >= length) are returned as they are, without a copy.
        """
        if self.whole_cache:
            raise ValueError(
                f"the {part_name(self.allocator)} allocator selects over every layer at once: apply the press with "
                "`with press(model):` (or call kvpress_chunk.whole_cache.select_globally on every layer's scores)"
            )
        keys, values = inputs.keys, inputs.values
        batch, _, length, _ = keys.shape
        rule, window = self.rule, self.scorer.window
        if layer_budget is None:
            if rule.is_noop or length <= window or rule.kept(length) >= length:
                return keys, values, Selection.everything(batch, length, keys.device, inputs.valid)
            kind, value, sizing = rule.kind, rule.value_tensor(keys.device), rule
        else:
            largest = int(layer_budget.max())
            if length <= window or bool((layer_budget >= inputs.valid.sum(dim=-1)).all()):
                return keys, values, Selection.everything(batch, length, keys.device, inputs.valid)
            kind, value, sizing = "budget", layer_budget.to(keys.device), Budget(budget=max(1, largest))
        capacity = self.selector.capacity(
            length, window, sizing, self.grouper.max_group_size, self.grouper.num_groups(length)
        )
        if self.allocator.pools_heads:
            capacity = length  # a pooled head may keep every token; all-padding columns are trimmed
        extra = self.scorer.prepare(inputs)
        group_extra = self.grouper.prepare(inputs)
        kept_keys, kept_values, indices, slot_valid = self.compress_fn(kind, keys.device)(
            keys, values, inputs.valid, extra, capacity, value, group_extra
        )
        selection = Selection(indices, slot_valid, length)
        trimmed = selection.trimmed()
        if trimmed is not selection:
            width = trimmed.indices.shape[-1]
            kept_keys = kept_keys[..., -width:, :].contiguous()
            kept_values = kept_values[..., -width:, :].contiguous()
        return kept_keys, kept_values, trimmed

    def compress_layer(
        self, inputs: LayerInputs, earlier: Mapping[int, Selection], compressed: Sequence[int],
        layer_budget: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Selection]:
        """Planner, then select: apply the source layer's selection when the planner names another
        layer that was already compressed (``earlier``: layer -> Selection of this prefill), else
        score and select afresh. ``compressed``: the layers the press compresses, in order (the
        planner groups those; ``range(num_layers)`` on a model without sliding-window layers).
        What the hooks do per layer, usable without them (benchmarks)."""
        source = self.planner.source_among(inputs.layer_idx, compressed)
        reused = earlier.get(source) if source != inputs.layer_idx else None
        if reused is None:
            return self.select(inputs, layer_budget)
        kept_keys, kept_values = reused.apply(inputs.keys, inputs.values)
        return kept_keys, kept_values, reused

    def score_layer(self, inputs: LayerInputs) -> torch.Tensor:
        """Eager token scores ``[B, Hs, T]`` of one layer (``Hs`` = 1 when heads share a selection),
        for the whole-cache stage: the same scores the fused op would rank."""
        scores = self.scorer.score(inputs.keys, inputs.valid, **self.scorer.prepare(inputs))
        return scores if self.selector.per_head else scores.sum(dim=1, keepdim=True)

    # -- the context manager ----------------------------------------------------------------------

    @contextmanager
    def __call__(self, model: nn.Module, tokenizer: Any = None) -> Iterator["PressSession"]:
        """Hook ``model`` so that every prefill is compressed; the hooks go when the block exits
        (exceptions included). Yields the :class:`~.session.PressSession` (selections of the last
        prefill). ``tokenizer`` is needed only by scorers with a context pass (``kvzip``): without
        it the one saved with the model (``config.name_or_path``) is loaded, or an error says so."""
        session = PressSession(self, model, tokenizer)
        with session.attached():
            yield session


def part_spec(part: Any) -> dict[str, Any]:
    """``{"name": registered name, setting: value, ...}`` of a part instance."""
    return {"name": part_name(part), **{f.name: getattr(part, f.name) for f in dataclasses.fields(part) if f.init}}

"""Allocators: how the press budget is spread over layers and KV heads.

The press budget says how many tokens a row keeps *per layer and head on average*
(``compression_ratio`` or ``budget``, see :mod:`..budget`). An allocator decides where they go;
whatever it does, the cache keeps exactly ``layers x heads x kept`` tokens per row in total
(property-tested), protected tokens (sinks, observation window) included.

* ``uniform``: every layer and head keeps the same count (the classic presses).
* ``pyramid`` (PyramidKV, arXiv 2406.02069): lower layers keep more, upper layers less, linearly;
  same total. Decided layer by layer inside the prefill hooks.
* ``adaptive`` (AdaKV, arXiv 2407.11550): each layer keeps the uniform count, but its heads share
  one pool: heads whose attention is concentrated give budget to heads that need more. Heads then
  keep different counts (``ragged heads``): evict mode pads each head to the widest.
* ``global`` (the KVzip default, arXiv 2505.23416): one top-k over every layer and head. It needs
  every layer's scores before evicting anything, so it runs in the *whole-cache stage* after the
  prefill (the uncompressed cache is alive until then), not in the per-layer hooks.

Allocators are pure Python over integers (no tensors): they run eagerly, once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .validation import check_number


class Allocator:
    """Base class: frozen dataclasses registered with ``@register("allocator", name)``.

    ``whole_cache``: needs every layer's scores first (the whole-cache stage after the prefill).
    ``pools_heads``: a layer's heads share one budget (ragged per-head counts).
    ``sets_layer_budgets``: derived from whether :meth:`layer_budget` is overridden.
    ``pool_floor``: the share of the free budget each pool keeps first (0 unless the allocator
    pools budgets: :class:`PoolingAllocator`)."""

    whole_cache: bool = False
    pools_heads: bool = False

    @property
    def pool_floor(self) -> float:
        return 0.0

    @property
    def sets_layer_budgets(self) -> bool:
        """Whether layers get budgets other than the press rule's (``layer_budget`` overridden)."""
        return type(self).layer_budget is not Allocator.layer_budget

    def layer_budget(self, kept: int, protected: int, length: int, rank: int, layers: int) -> int:
        """Tokens the ``rank``-th of ``layers`` compressed layers keeps, for a row of ``length``
        real tokens whose uniform share is ``kept`` (protected tokens included)."""
        return kept


@register("allocator", "uniform")
@dataclass(frozen=True)
class UniformAllocator(Allocator):
    """Every layer and head keeps the same number of tokens."""


def pyramid_budgets(kept: int, protected: int, length: int, layers: int, spread: float) -> list[int]:
    """Per-layer budgets, decreasing linearly from the bottom layer, summing to ``layers * kept``.

    The free part (``kept - protected`` per layer) is spread with weights ``1 + spread * (1 - 2 l /
    (L - 1))``, capped so that no layer asks for more than ``length`` tokens; rounding leftovers go
    to the lowest layers, so the sum is exact."""
    protected = min(protected, kept)
    free_total = (kept - protected) * layers
    room = length - protected
    if layers == 1 or free_total == 0:
        return [kept] * layers
    weights = [1 + spread * (1 - 2 * layer / (layers - 1)) for layer in range(layers)]
    # Cap: the largest weight times the mean free share must fit in a layer.
    mean = free_total / layers
    largest = max(weights)
    if mean * largest > room and largest > 1:
        scale = max(0.0, (room / mean - 1) / (largest - 1))
        weights = [1 + (w - 1) * scale for w in weights]
    total_weight = sum(weights)
    shares = [min(room, int(free_total * w / total_weight)) for w in weights]
    leftover = free_total - sum(shares)
    layer = 0
    while leftover > 0:
        if shares[layer] < room:
            shares[layer] += 1
            leftover -= 1
        layer = (layer + 1) % layers
    return [protected + share for share in shares]


@register("allocator", "pyramid")
@dataclass(frozen=True)
class PyramidAllocator(Allocator):
    """PyramidKV (arXiv 2406.02069): budgets decrease linearly with depth; ``spread`` in [0, 1)
    is how far the bottom layer's free share sits above the mean (and the top one below it)."""

    spread: float = 0.5

    def __post_init__(self) -> None:
        check_number(self, "spread", minimum=0, below=1,
                     meaning="how far the bottom layer's free share sits above the mean")

    def layer_budget(self, kept: int, protected: int, length: int, rank: int, layers: int) -> int:
        return pyramid_budgets(kept, protected, length, layers, float(self.spread))[rank]


@dataclass(frozen=True)
class PoolingAllocator(Allocator):
    """Base of the allocators whose pools (a layer's heads, or every layer and head) share one
    budget, ranked together. ``floor``: the share of an even split of the free budget each pool
    keeps first (AdaKV's safeguard; kvpress uses 0.2; 0 ranks everything together)."""

    pools_heads = True
    floor: float = 0.0

    def __post_init__(self) -> None:
        check_number(self, "floor", minimum=0, maximum=1, meaning="share of an even split each pool keeps first")

    @property
    def pool_floor(self) -> float:
        return self.floor


@register("allocator", "adaptive")
@dataclass(frozen=True)
class AdaptiveAllocator(PoolingAllocator):
    """AdaKV (arXiv 2407.11550): a layer's heads share its budget, ranked together by score
    (``floor``: each head's guaranteed share, see :class:`PoolingAllocator`)."""


@register("allocator", "global")
@dataclass(frozen=True)
class GlobalAllocator(PoolingAllocator):
    """One top-k over every layer and head (KVzip's default, arXiv 2505.23416); runs after the
    prefill over the whole cache (``floor``: each layer and head's guaranteed share, see
    :class:`PoolingAllocator`)."""

    whole_cache = True

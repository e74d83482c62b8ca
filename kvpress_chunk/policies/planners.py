"""Planners: which layer selects afresh, and which reuses another layer's selection.

ChunkKV's layer-wise index reuse (paper, Algorithm 2): kept indices of adjacent layers overlap
much more for chunks than for single tokens, so layers are split into consecutive groups of
``every`` layers; the first layer of each group scores and selects, the others gather with its
indices and skip scoring entirely (the saving grows with ``every``; the paper uses 2).

The groups are of consecutive *compressed* layers: a model whose sliding-window layers sit between
its full-attention ones (Gemma 2: every other layer; Gemma 3: five in six) groups its full layers.
Grouped by layer index, each full layer's group leader was a sliding layer, which is never
compressed, so every layer selected afresh and ``reuse_every`` did nothing, without a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..registry import register
from .validation import check_int


class Planner:
    """Base class: frozen dataclasses registered with ``@register("planner", name)``."""

    def source_layer(self, layer_idx: int) -> int:
        """The layer whose selection ``layer_idx`` applies (itself = select afresh)."""
        raise NotImplementedError

    def source_among(self, layer_idx: int, compressed: Sequence[int]) -> int:
        """The layer whose selection ``layer_idx`` applies, knowing the layers the press
        compresses (``compressed``, in order; sliding-window layers are not among them). What the
        press calls; by default :meth:`source_layer`."""
        return self.source_layer(layer_idx)

    @property
    def shares_selections(self) -> bool:
        """Whether some layer applies another layer's selection: allocators that size each layer
        on its own refuse such planners. Planners declare it; one that does not is probed over
        the first 256 layers (as deep as any released model goes)."""
        return any(self.source_layer(idx) != idx for idx in range(256))


@register("planner", "every_layer")
@dataclass(frozen=True)
class EveryLayer(Planner):
    """Each layer scores and selects on its own."""

    shares_selections = False  # type: ignore[assignment]

    def source_layer(self, layer_idx: int) -> int:
        return layer_idx


@register("planner", "reuse")
@dataclass(frozen=True)
class ReuseEvery(Planner):
    """Groups of ``every`` consecutive compressed layers share the selection of their first layer."""

    every: int = 2

    def __post_init__(self) -> None:
        check_int(self, "every", minimum=1, meaning="layers sharing one selection")

    @property
    def shares_selections(self) -> bool:
        return self.every > 1

    def source_layer(self, layer_idx: int) -> int:
        """The group leader when every layer is compressed (groups by layer index)."""
        return layer_idx - layer_idx % self.every

    def source_among(self, layer_idx: int, compressed: Sequence[int]) -> int:
        layers = list(compressed)
        if layer_idx not in layers:
            return self.source_layer(layer_idx)
        rank = layers.index(layer_idx)
        return layers[rank - rank % self.every]

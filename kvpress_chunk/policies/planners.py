"""Planners: which layer selects afresh, and which reuses another layer's selection.

ChunkKV's layer-wise index reuse (paper, Algorithm 2): kept indices of adjacent layers overlap
much more for chunks than for single tokens, so layers are split into consecutive groups of
``every`` layers; the first layer of each group scores and selects, the others gather with its
indices and skip scoring entirely (the saving grows with ``every``; the paper uses 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from .validation import check_int


class Planner:
    """Base class: frozen dataclasses registered with ``@register("planner", name)``."""

    def source_layer(self, layer_idx: int) -> int:
        """The layer whose selection ``layer_idx`` applies (itself = select afresh)."""
        raise NotImplementedError


@register("planner", "every_layer")
@dataclass(frozen=True)
class EveryLayer(Planner):
    """Each layer scores and selects on its own."""

    def source_layer(self, layer_idx: int) -> int:
        return layer_idx


@register("planner", "reuse")
@dataclass(frozen=True)
class ReuseEvery(Planner):
    """Groups of ``every`` consecutive layers share the selection of their first layer."""

    every: int = 2

    def __post_init__(self) -> None:
        check_int(self, "every", minimum=1, meaning="layers sharing one selection")

    def source_layer(self, layer_idx: int) -> int:
        return layer_idx - layer_idx % self.every

"""Policy parts, in data-flow order: scorers -> groupers -> selectors -> planners; and presets."""

from . import allocators, expected_attention, groupers, kvzip, planners, presets, scorers, selectors  # noqa: F401  (registers the parts)
from .allocators import AdaptiveAllocator, Allocator, GlobalAllocator, PyramidAllocator, UniformAllocator
from .groupers import ChunkGrouper, Grouper, TokenGrouper
from .layer_inputs import LayerInputs
from .planners import EveryLayer, Planner, ReuseEvery
from .presets import list_presets, preset
from .kvzip import KVzipScorer
from .scorers import KnormScorer, RandomScorer, RecencyScorer, Scorer, SnapKVScorer
from .selectors import HeadAdaptiveSelector, Selector, TopKSelector

__all__ = [
    "AdaptiveAllocator", "Allocator", "GlobalAllocator", "PyramidAllocator", "UniformAllocator",
    "ChunkGrouper", "EveryLayer", "HeadAdaptiveSelector", "Grouper", "KnormScorer", "LayerInputs", "Planner", "RandomScorer",
    "RecencyScorer", "ReuseEvery", "Scorer", "Selector", "SnapKVScorer", "TokenGrouper", "TopKSelector",
    "list_presets", "preset",
]

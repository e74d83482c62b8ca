"""Compiled FlexAttention for mask-mode decoding steps, refusing to degrade silently.

FlexAttention is compiled once with ``dynamic=True``: decoding grows the KV length every step,
and a static compile would recompile per step until dynamo's recompile limit, after which it
silently runs uncompiled (slow, and on CPU it ignores the block lists). We count the compiled
graphs and raise before that can happen.

If inductor cannot build the CPU flex kernel on a machine at all, :data:`FLEX_STATUS` records it
and mask mode continues with SDPA and a dense boolean mask (same results, slower), with one
warning. The status is one explicit object so that tests can inspect and reset it.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import torch
import torch._dynamo.eval_frame as eval_frame
from torch.nn.attention.flex_attention import flex_attention

from .block_masks import PrefixBlocks, fold_rows


class FlexFallbackError(RuntimeError):
    """Compiled FlexAttention would fall back to the slow uncompiled path."""


class FlexRecompileLimit(FlexFallbackError):
    def __init__(self, graphs: int, limit: int):
        super().__init__(
            f"FlexAttention has compiled {graphs} graphs (dynamo's recompile limit is {limit}); further shapes "
            "would silently run the uncompiled, much slower path. Bucket sequence lengths, or raise "
            "torch._dynamo.config.recompile_limit."
        )


@dataclass
class FlexStatus:
    """Whether compiled CPU flex works in this process (``broken`` after a failed kernel build)."""

    broken: bool = False
    reason: str = ""

    def mark_broken(self, exc: Exception) -> None:
        self.broken, self.reason = True, type(exc).__name__
        warnings.warn(
            "kvpress-chunk: compiling FlexAttention failed on this machine "
            f"({self.reason}); mask mode continues with SDPA and a dense boolean mask "
            "(same results, slower decoding). See docs/apply_modes.md.",
            RuntimeWarning,
            stacklevel=3,
        )

    def reset(self) -> None:
        self.broken, self.reason = False, ""


FLEX_STATUS = FlexStatus()


def _flex(query, key, value, block_mask, scale):
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True)


# One compiled function, with its own code object, per attention geometry (heads, head size,
# dtype, scale): dynamo's recompile limit counts per code object, so one model's graphs never
# push another model (or a test sweeping many shapes) onto the silent uncompiled path. Within a
# geometry, decoding compiles one dynamic graph (plus at most one size specialisation).
_COMPILED_FLEX: dict[tuple, object] = {}


def _compiled_flex_for(geometry: tuple):
    fn = _COMPILED_FLEX.get(geometry)
    if fn is None:
        from ..compile.cache import prepare_inductor

        prepare_inductor()
        name = f"kvpress_chunk_flex_{len(_COMPILED_FLEX)}"
        own = types.FunctionType(_flex.__code__.replace(co_name=name), _flex.__globals__, name)
        fn = torch.compile(own, dynamic=True, fullgraph=True)
        _COMPILED_FLEX[geometry] = fn
    return fn


def _graphs(fn) -> int:
    return len(eval_frame._debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))


def graph_counts() -> dict[tuple, int]:
    """Compiled graphs per attention geometry ``(query heads, KV heads, head size, dtype, scale)``."""
    return {geometry: _graphs(fn) for geometry, fn in _COMPILED_FLEX.items()}


def compiled_graph_count() -> int:
    """Graphs dynamo holds for our flex wrappers, all geometries together (each one a compile)."""
    return sum(graph_counts().values())


def flex_attend(query, key, value, block_mask, scale: float) -> torch.Tensor:
    """Compiled flex attention, refusing to degrade silently into the uncompiled path."""
    fn = _compiled_flex_for((query.shape[1], key.shape[1], query.shape[-1], query.dtype, float(scale)))
    before = _graphs(fn)
    out = fn(query, key, value, block_mask, scale)
    after = _graphs(fn)
    limit = torch._dynamo.config.recompile_limit
    if after > before and after >= limit:
        raise FlexRecompileLimit(after, limit)
    return out


def is_compile_failure(exc: Exception) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    return isinstance(exc, (InductorError, BackendCompilerFailed)) and not isinstance(exc, FlexFallbackError)


def flex_decode_step(query, key, value, blocks: PrefixBlocks, scale: float) -> torch.Tensor | None:
    """One decoding query per row through the prefix's BlockMask: ``[B, Hq, 1, D]``, or ``None``
    when flex is unavailable on this machine (the caller then uses the dense mask).

    One flex call for the whole batch: rows are folded into the head axis (see
    :class:`~.block_masks.PrefixBlocks`), because torch 2.13's CPU flex template emits invalid C++
    for a batch dimension > 1 under dynamic shapes (seen for every batch size >= 2 we tried)."""
    if FLEX_STATUS.broken:
        return None
    batch, heads = query.shape[:2]
    try:
        block_mask = blocks.block_mask(key.shape[2])
        out = flex_attend(fold_rows(query), fold_rows(key), fold_rows(value), block_mask, scale)
    except Exception as exc:  # inductor's C++ build or codegen failed for this shape
        if not is_compile_failure(exc):
            raise
        FLEX_STATUS.mark_broken(exc)
        return None
    return out.view(batch, heads, *out.shape[2:])

"""Masked attention for HF models: compressed layers attend through a FlexAttention BlockMask.

``ATTENTION_NAME`` is registered with transformers' ``AttentionInterface`` (and, for mask
creation, ``AttentionMaskInterface`` with the SDPA mask), so every model that dispatches through
that interface can run in ``apply="mask"`` mode. Layers without a compressed prefix (the
prefill itself, sliding layers, other models) run SDPA unchanged.

FlexAttention is compiled once with ``dynamic=True``: decoding grows the KV length every step,
and a static compile would recompile per step until dynamo's recompile limit, after which it
silently runs uncompiled. We count the compiled graphs and raise before that can happen.
"""

from __future__ import annotations

import types
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch._dynamo.eval_frame as eval_frame
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from .masks import dense_prefix_mask, selection_block_mask

ATTENTION_NAME = "kvpress_chunk_mask"


class FlexFallbackError(RuntimeError):
    """Compiled FlexAttention would fall back to the slow uncompiled path."""


@dataclass
class LayerMask:
    """The compressed prefix of one layer: ``kept[B, Hs, T]`` and the KV block size."""

    kept: torch.Tensor
    block_size: int


# attention module -> its LayerMask while a mask-mode press session holds it
_LAYER_MASKS: "weakref.WeakKeyDictionary[nn.Module, LayerMask]" = weakref.WeakKeyDictionary()


def set_layer_mask(module: nn.Module, mask: LayerMask | None) -> None:
    if mask is None:
        _LAYER_MASKS.pop(module, None)
    else:
        _LAYER_MASKS[module] = mask


def _flex(query, key, value, block_mask, scale):
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True)


# Own code object: the graph count below is ours alone, not shared with other flex users.
_flex_own = types.FunctionType(_flex.__code__.replace(co_name="kvpress_chunk_flex"), _flex.__globals__, "kvpress_chunk_flex")
compiled_flex = torch.compile(_flex_own, dynamic=True, fullgraph=True)


def compiled_graph_count() -> int:
    """Graphs dynamo holds for our flex wrapper (each new one is a compile)."""
    return len(eval_frame._debug_get_cache_entry_list(_flex_own.__code__))


def flex_attend(query, key, value, block_mask, scale: float) -> torch.Tensor:
    """Compiled flex attention, refusing to degrade silently into the uncompiled path."""
    before = compiled_graph_count()
    out = compiled_flex(query, key, value, block_mask, scale)
    after = compiled_graph_count()
    limit = torch._dynamo.config.recompile_limit
    if after > before and after >= limit:
        raise FlexRecompileLimit(after, limit)
    return out


class FlexRecompileLimit(FlexFallbackError):
    def __init__(self, graphs: int, limit: int):
        super().__init__(
            f"FlexAttention has compiled {graphs} graphs (dynamo's recompile limit is {limit}); further shapes "
            "would silently run the uncompiled, much slower path. Bucket sequence lengths, or raise "
            "torch._dynamo.config.recompile_limit."
        )


FLEX_STATE = {"broken": False}


def _is_compile_failure(exc: Exception) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    return isinstance(exc, (InductorError, BackendCompilerFailed)) and not isinstance(exc, FlexFallbackError)


def _flex_per_row(query, key, value, layer_mask: LayerMask, scale: float) -> torch.Tensor:
    """One flex call per batch row: with a batch dimension > 1, torch 2.13's CPU flex template
    emits invalid C++ under dynamic shapes (seen for every batch size >= 2 we tried)."""
    rows = []
    for row in range(query.shape[0]):
        block_mask = selection_block_mask(layer_mask.kept[row : row + 1], query.shape[1], key.shape[2], layer_mask.block_size)
        rows.append(flex_attend(query[row : row + 1], key[row : row + 1], value[row : row + 1], block_mask, scale))
    return torch.cat(rows, dim=0)


def masked_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """AttentionInterface function: flex through the layer's BlockMask, SDPA elsewhere."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer_mask = _LAYER_MASKS.get(module)
    if layer_mask is None or key.shape[2] < layer_mask.kept.shape[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_heads, q_length, kv_length = query.shape[1], query.shape[2], key.shape[2]
    if q_length == 1 and not FLEX_STATE["broken"]:
        try:
            out = _flex_per_row(query, key, value, layer_mask, scale)
        except Exception as exc:  # inductor's C++ build or codegen failed for this shape
            if not _is_compile_failure(exc):
                raise
            FLEX_STATE["broken"] = True
            warnings.warn(
                "kvpress-chunk: compiling FlexAttention failed on this machine "
                f"({type(exc).__name__}); mask mode continues with SDPA and a dense boolean mask "
                "(same results, slower decoding). See docs/apply_modes.md.",
                RuntimeWarning,
                stacklevel=2,
            )
    if q_length > 1 or FLEX_STATE["broken"]:
        dense = dense_prefix_mask(layer_mask.kept, q_heads, q_length, kv_length)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register_masked_attention() -> str:
    """Register the attention and mask functions with transformers (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, masked_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _REGISTERED = True
    return ATTENTION_NAME

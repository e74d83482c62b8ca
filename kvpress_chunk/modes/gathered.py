"""Mask-mode decoding by gathering the visible slots (the CPU path).

A decoding query over a mask-mode cache needs the keys its row and head may see: the kept
prefix slots, plus every token added after compression. :class:`PrefixSlots` lists the kept
prefix slots once per view (the selection does not change while decoding); each step gathers
them, with the new tokens, from the live cache in one ``index_select`` over the flattened
``[B * Hkv * L, D]`` keys (and values; a view, also of a growing layer's buffers:
:func:`~kvpress_chunk.hf.growing_layer.flat_rows`), and runs SDPA (``enable_gqa``) over that
short copy.
Rows or heads that keep fewer slots than the widest are padded and hidden by a boolean mask.

Why on CPU: torch 2.13's CPU FlexAttention picks its flash-decoding template (KV split across
threads) only for static shapes, and decoding grows the KV length every step, so the dynamic
graph we compile runs the generic template: one 1 x 16 GEMM per 16-token KV block, which
measured *slower* per key than SDPA over the whole cache (docs/apply_modes.md). Gathering a
quarter of an 8k cache costs about as much as one pass of SDPA over it, and SDPA over the
gathered quarter is then as fast as in evict mode. On accelerators flex (:mod:`.flex`) skips
blocks inside its kernel and is the default there; :func:`decode_kernel` says which one runs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..hf.growing_layer import flat_rows

#: Decode kernel of mask mode per device type; other devices use ``"flex"``. The environment
#: variable ``KVPRESS_CHUNK_MASK_DECODE`` (``flex`` or ``gather``) overrides it everywhere.
DECODE_KERNELS: dict[str, str] = {"cpu": "gather"}
KERNELS = ("flex", "gather")


def decode_kernel(device: torch.device) -> str:
    """``"flex"`` or ``"gather"``: how mask mode runs a decoding step on ``device``."""
    chosen = os.environ.get("KVPRESS_CHUNK_MASK_DECODE") or DECODE_KERNELS.get(device.type, "flex")
    if chosen not in KERNELS:
        raise ValueError(f"KVPRESS_CHUNK_MASK_DECODE must be one of {', '.join(KERNELS)}, got {chosen!r}")
    return chosen


class PrefixSlots:
    """Kept prefix slots of a view ``kept[B, Hs, T]`` as index lists, built once.

    ``index[B, Hs, W]``: the kept positions of each row (and head), ascending, padded with 0 to
    the widest count ``W``; ``slot_valid[B, Hs, W]`` marks the real entries."""

    def __init__(self, kept: torch.Tensor):
        kept = kept.to(torch.bool)
        self.prefix = kept.shape[-1]
        counts = kept.sum(dim=-1)
        width = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)[..., :width]
        self.slot_valid = torch.arange(width, device=kept.device) < counts[..., None]
        self.index = torch.where(self.slot_valid, order, torch.zeros_like(order))
        self.ragged = not bool(self.slot_valid.all())

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """``[B, Hq, 1, D]``: one decoding query per row over its visible slots of ``key[B, Hkv, L, D]``
        (``L > T``; the ``L - T`` tokens added after compression are all visible)."""
        batch, kv_heads, length, _ = key.shape
        new = torch.arange(self.prefix, length, device=key.device)
        index = self.index.expand(batch, kv_heads, -1) if self.index.shape[1] == 1 else self.index
        index = torch.cat([index, new.expand(batch, kv_heads, -1)], dim=-1)  # [B, Hkv, W + L - T]
        # rows of the flattened cache without copying it (a growing layer's views are strided)
        flat_keys, key_row = flat_rows(key)
        flat_values, value_row = flat_rows(value)
        row_heads = torch.arange(batch * kv_heads, device=key.device).view(batch, kv_heads, 1)
        keys = flat_keys.index_select(0, (index + row_heads * key_row).reshape(-1))
        values = flat_values.index_select(0, (index + row_heads * value_row).reshape(-1))
        keys = keys.view(batch, kv_heads, -1, key.shape[-1])
        values = values.view(batch, kv_heads, -1, value.shape[-1])
        mask = None
        if self.ragged:
            visible = torch.cat([self.slot_valid, self.slot_valid.new_ones(*self.slot_valid.shape[:2], length - self.prefix)], -1)
            if visible.shape[1] > 1:
                visible = visible.repeat_interleave(query.shape[1] // visible.shape[1], dim=1)
            mask = visible[:, :, None, :]
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)

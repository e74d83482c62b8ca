"""Selections as FlexAttention block masks (the ``apply="mask"`` mode).

Two views of one mask, always built together so they never disagree:

* ``mask_mod`` -- the semantics, one tiny pure function per rule in the style of attention-gym,
  composed with ``and_masks`` / ``or_masks``. Uncompiled flex reads *only* this.
* block lists -- which KV blocks to skip, compute fully, or compute with the ``mask_mod``; built
  arithmetically from the kept table (``BlockMask.from_kv_blocks``), never from a dense
  B*H*Q*KV tensor. With KV block = chunk size, ChunkKV's evicted chunks are whole skipped blocks.

Positions ``>= prefix_length`` are tokens added after compression (a question, generated
tokens): they are always visible, under the causal rule.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, _mask_mod_signature, and_masks, or_masks  # noqa: F401

Q_BLOCK_SIZE = 128


def generate_compressed_prefix_mask(kept: torch.Tensor, offset: torch.Tensor, head_groups: int) -> _mask_mod_signature:
    """Prefix tokens are visible iff ``kept[b, h // head_groups, kv]``; tokens added after
    compression follow the causal rule (queries sit at ``offset + q``).

    Two CPU-inductor workarounds (torch 2.13), both found the hard way:

    * the tables are bound as *default arguments*, not closure cells: a closure-captured table
      makes inductor emit invalid C++ (``cur_qSplitSize9 was not declared``);
    * one ``where`` instead of ``and_masks(keep_table, causal)``.

    ``kept[B, Hs, T]`` has a fixed size after prefill and ``offset`` is a 0-d tensor, so decoding
    steps that grow the KV length reuse one compiled graph.
    """
    shared = kept.shape[1] == 1

    def compressed_prefix(b, h, q, kv, table=kept, offset=offset):
        head = h * 0 if shared else h // head_groups
        in_table = table[b, head, torch.clamp(kv, max=table.shape[-1] - 1)]
        return torch.where(kv < table.shape[-1], in_table, kv <= q + offset)

    return compressed_prefix


def generate_causal_mask(offset: torch.Tensor) -> _mask_mod_signature:
    """Causal with queries placed at ``offset + q_idx`` (offset = kv_length - q_length, a 0-d tensor)."""

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    causal.__name__ = "causal_offset"
    return causal


def generate_sinks_mask(n_sinks: int) -> _mask_mod_signature:
    """The first ``n_sinks`` positions (StreamingLLM's attention sinks)."""

    def sinks(b, h, q_idx, kv_idx):
        return kv_idx < n_sinks

    sinks.__name__ = f"sinks{n_sinks}"
    return sinks


def generate_recent_mask(start: torch.Tensor) -> _mask_mod_signature:
    """Every position from ``start`` (a 0-d tensor) on: a recent window."""

    def recent(b, h, q_idx, kv_idx):
        return kv_idx >= start

    recent.__name__ = "recent"
    return recent


def allowed_prefix(kept: torch.Tensor, query_heads: int) -> torch.Tensor:
    """``[B, Hm, T]`` kept table at the head granularity of the block mask (1 or query heads)."""
    if kept.shape[1] == 1:
        return kept
    return kept.repeat_interleave(query_heads // kept.shape[1], dim=1)


def _block_lists(flags: torch.Tensor, q_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``flags[B, H, n_kv_blocks]`` -> (count, indices) in FlexAttention's layout; selected blocks
    first, ascending; the index list spans every KV block (BlockMask requires the full width)."""
    counts = flags.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    batch, heads, _ = flags.shape
    counts = counts[:, :, None].expand(batch, heads, q_blocks).contiguous()
    order = order[:, :, None, :].expand(batch, heads, q_blocks, order.shape[-1]).contiguous()
    return counts, order


def selection_block_mask(
    kept: torch.Tensor,
    query_heads: int,
    q_length: int,
    kv_length: int,
    block_size: int,
) -> BlockMask:
    """The BlockMask of a compressed prefix ``kept[B, Hs, T]`` for ``q_length`` new queries over
    ``kv_length`` keys (``kv_length - T`` tokens were added after compression)."""
    batch, kv_heads, prefix = kept.shape
    device = kept.device
    head_groups = query_heads // kv_heads if kv_heads > 1 else 1
    offset = torch.tensor(kv_length - q_length, device=device)
    mask_mod = generate_compressed_prefix_mask(kept, offset, head_groups)

    n_kv_blocks = -(-kv_length // block_size)
    table = allowed_prefix(kept, query_heads)
    heads = table.shape[1]
    padded = torch.zeros(batch, heads, n_kv_blocks * block_size, dtype=torch.bool, device=device)
    padded[..., :prefix] = table
    padded[..., prefix:kv_length] = True
    counts = padded.view(batch, heads, n_kv_blocks, block_size).sum(dim=-1)
    starts = torch.arange(n_kv_blocks, device=device) * block_size
    touches_new = starts + block_size > prefix
    full = counts == block_size
    if q_length > 1:
        full = full & ~touches_new  # new-token blocks need the causal rule
    partial = (counts > 0) & ~full
    q_blocks = -(-q_length // Q_BLOCK_SIZE)
    kv_num, kv_idx = _block_lists(partial, q_blocks)
    full_num, full_idx = _block_lists(full, q_blocks)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx,
        BLOCK_SIZE=(Q_BLOCK_SIZE, block_size),
        mask_mod=mask_mod,
        seq_lengths=(q_length, kv_length),
        compute_q_blocks=False,
    )

"""Selections as FlexAttention block masks (the ``apply="mask"`` mode).

Two views of one mask, always built together so they never disagree:

* ``mask_mod`` -- the semantics, one tiny pure function in the style of attention-gym
  (:func:`generate_compressed_prefix_mask`, a factory closing over the kept table). Uncompiled
  flex reads *only* this.
* block lists -- which KV blocks to skip, compute fully, or compute with the ``mask_mod``; built
  arithmetically from the kept table (``BlockMask.from_kv_blocks``), never from a dense
  B*H*Q*KV tensor. With 16-token KV blocks (:data:`KV_BLOCK_SIZE`), chunks of 16 (or multiples)
  that were evicted are whole skipped blocks.

Positions past the compressed prefix are tokens added after compression (a question, generated
tokens): they are always visible, under the causal rule. Decoding steps (one query) run
FlexAttention with the block mask; multi-token forwards (a follow-up question) run SDPA with
:func:`dense_prefix_mask`, the same rule as a dense boolean tensor.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, _mask_mod_signature

Q_BLOCK_SIZE = 128
#: KV block size of mask mode. Compiled CPU flex (torch 2.13) returns garbage for KV blocks that
#: are not multiples of 16 (measured: 8, 10) and, in our hypothesis runs, for 32 with short
#: sequences; 16 passed every check. Chunks whose size is a multiple of 16 are whole blocks.
KV_BLOCK_SIZE = 16
KV_BLOCK_MULTIPLE = KV_BLOCK_SIZE


def generate_compressed_prefix_mask(table: torch.Tensor) -> _mask_mod_signature:
    """For one decoding query: prefix tokens are visible iff ``table[b, h, kv]`` (one row per
    query head); tokens added after compression are always visible (they precede the query).

    CPU-inductor workarounds (torch 2.13), found the hard way: the table is bound as a *default
    argument* (a closure-captured table makes inductor emit invalid C++, ``cur_qSplitSize9 was
    not declared``); the mask does not read ``q`` (the same bug for some shapes), so multi-token
    queries go through :func:`dense_prefix_mask`; and the table always has one row per query
    head, shared or per-head selection alike (a head-index expression, or a recompile between
    the two layouts, hits the bug again). The table has a fixed size after prefill, so decoding
    steps that grow the KV length reuse one compiled graph.
    """

    def compressed_prefix(b, h, q, kv, table=table):
        return table[b, h, torch.clamp(kv, max=table.shape[-1] - 1)] | (kv >= table.shape[-1])

    return compressed_prefix


def dense_prefix_mask(
    kept: torch.Tensor, query_heads: int, q_length: int, kv_length: int, appended_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``bool[B, H, q_length, kv_length]``: the same rule for ``q_length`` queries at the end of
    the sequence, causal among the tokens added after compression (for SDPA / eager attention).

    ``appended_valid[B, kv_length - T]`` (optional) marks which tokens added after compression are
    real (from the forward's 2-D attention mask); by default all are."""
    batch, kv_heads, prefix = kept.shape
    table = allowed_prefix(kept, query_heads)
    query_pos = torch.arange(kv_length - q_length, kv_length, device=kept.device)
    new_pos = torch.arange(prefix, kv_length, device=kept.device)
    causal_new = (new_pos[None, :] <= query_pos[:, None]).expand(batch, table.shape[1], q_length, kv_length - prefix)
    if appended_valid is not None:
        causal_new = causal_new & appended_valid.to(torch.bool)[:, None, None, :]
    return torch.cat([table[:, :, None, :].expand(-1, -1, q_length, -1), causal_new], dim=-1)


def allowed_prefix(kept: torch.Tensor, query_heads: int) -> torch.Tensor:
    """``[B, Hq, T]`` kept table with one row per query head (GQA groups share their KV head's row)."""
    if kept.shape[1] == 1:
        return kept.expand(kept.shape[0], query_heads, kept.shape[2]).contiguous()
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


def selection_block_mask(kept: torch.Tensor, query_heads: int, kv_length: int, block_size: int) -> BlockMask:
    """The BlockMask of a compressed prefix ``kept[B, Hs, T]`` for one decoding query over
    ``kv_length`` keys (``kv_length - T`` tokens were added after compression)."""
    if block_size % KV_BLOCK_MULTIPLE:
        raise ValueError(
            f"KV block size must be a multiple of {KV_BLOCK_MULTIPLE}, got {block_size}: compiled CPU flex "
            "attention (torch 2.13) returns wrong results for other sizes"
        )
    batch, _, prefix = kept.shape
    device = kept.device
    table = allowed_prefix(kept, query_heads)
    mask_mod = generate_compressed_prefix_mask(table)

    n_kv_blocks = -(-kv_length // block_size)
    heads = table.shape[1]
    padded = torch.zeros(batch, heads, n_kv_blocks * block_size, dtype=torch.bool, device=device)
    padded[..., :prefix] = table
    padded[..., prefix:kv_length] = True
    counts = padded.view(batch, heads, n_kv_blocks, block_size).sum(dim=-1)
    full = counts == block_size
    partial = (counts > 0) & ~full
    kv_num, kv_idx = _block_lists(partial, 1)
    full_num, full_idx = _block_lists(full, 1)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx,
        BLOCK_SIZE=(Q_BLOCK_SIZE, block_size),
        mask_mod=mask_mod,
        seq_lengths=(1, kv_length),
        compute_q_blocks=False,
    )


class PrefixBlocks:
    """The block tables of one compressed prefix, built once and extended as decoding grows the
    cache: a new KV block appears only every ``block_size`` tokens, so the per-step work is one
    cached lookup and a :class:`BlockMask` constructor call (no tensor work).

    Batch rows are folded into the head axis (``[1, B * Hq, ...]``; :func:`fold_rows` does the
    same to queries, keys and values, a free view of a contiguous cache), so one flex call
    serves the whole batch with a batch dimension of 1: the CPU flex kernel of torch 2.13 emits
    invalid C++ for a symbolic batch dimension, not for more heads. GQA still maps query head
    ``b * Hq + i`` to KV head ``b * Hkv + i // G`` of the folded keys.

    Block layout for ``kv_length > T`` keys (``n`` blocks): prefix blocks as the kept table says
    (all kept: full; some: partial; none: skipped); the block straddling the prefix end and the
    last block: partial (the ``mask_mod`` decides, and the kernel bounds the ragged tail);
    blocks between them: full. It depends on ``n`` only, so it is cached per ``n``.
    """

    def __init__(self, kept: torch.Tensor, query_heads: int, block_size: int):
        if block_size % KV_BLOCK_MULTIPLE:
            raise ValueError(
                f"KV block size must be a multiple of {KV_BLOCK_MULTIPLE}, got {block_size}: compiled CPU flex "
                "attention (torch 2.13) returns wrong results for other sizes"
            )
        batch, _, prefix = kept.shape
        table = allowed_prefix(kept.to(torch.bool), query_heads)
        self.rows, self.query_heads, self.prefix, self.block_size = batch, query_heads, prefix, block_size
        self.table = table.reshape(1, batch * query_heads, prefix).contiguous()
        self.mask_mod = generate_compressed_prefix_mask(self.table)
        whole = prefix // block_size
        counts = self.table[..., : whole * block_size].reshape(1, batch * query_heads, whole, block_size).sum(dim=-1)
        self._prefix_full = counts == block_size  # [1, B*Hq, whole prefix blocks]
        self._prefix_partial = (counts > 0) & ~self._prefix_full
        self._lists: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def _block_lists_for(self, n_blocks: int) -> tuple[torch.Tensor, ...]:
        if self._lists is not None and self._lists[0] == n_blocks:
            return self._lists[1]
        whole = self._prefix_full.shape[-1]
        heads = self.table.shape[1]
        device = self.table.device
        full = torch.zeros(1, heads, n_blocks, dtype=torch.bool, device=device)
        partial = torch.zeros(1, heads, n_blocks, dtype=torch.bool, device=device)
        full[..., :whole] = self._prefix_full
        partial[..., :whole] = self._prefix_partial
        full[..., whole:] = True  # blocks holding tokens added after compression ...
        full[..., whole] = False  # ... except the one straddling the prefix end (or holding its first new tokens)
        full[..., n_blocks - 1] = False  # ... and the last, ragged one: both computed with the mask_mod
        partial[..., whole] = True
        partial[..., n_blocks - 1] = True
        lists = (*_block_lists(partial, 1), *_block_lists(full, 1))
        self._lists = (n_blocks, lists)
        return lists

    def block_mask(self, kv_length: int) -> BlockMask:
        """The folded BlockMask (``[1, B * Hq]``) for one decoding query over ``kv_length > T`` keys."""
        if kv_length <= self.prefix:
            raise ValueError(f"a decoding query needs keys past the prefix ({kv_length} <= {self.prefix})")
        kv_num, kv_idx, full_num, full_idx = self._block_lists_for(-(-kv_length // self.block_size))
        return BlockMask(
            (1, kv_length), kv_num, kv_idx, full_num, full_idx, None, None, None, None,
            BLOCK_SIZE=(Q_BLOCK_SIZE, self.block_size), mask_mod=self.mask_mod,
        )


def fold_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[1, B * H, L, D]`` (a view when the rows are contiguous)."""
    return tensor.reshape(1, tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])

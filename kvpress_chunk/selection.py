"""Selection: the kept token indices of one layer, the central value of the library.

``indices[B, Hs, K]`` holds kept positions in ascending order (``Hs`` = 1 when all KV heads share
the selection, ``Hkv`` for per-head selections). Rows that keep fewer tokens than the widest row
are left-padded with ``-1``: ``slot_valid`` is ``False`` there, and the evicted cache is
left-padded the same way, which a 2-D attention mask (:meth:`attention_mask`) hides from later
forwards, exactly like HF's own left padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gather_kv(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Evict: gather kept positions along the sequence axis (``-1`` slots read position 0 and are
    masked later). Shared selections broadcast over heads without copying the index."""
    index = indices.clamp(min=0).unsqueeze(-1)
    batch, kv_heads, _, key_dim = keys.shape
    kept = index.shape[2]
    key_index = index.expand(batch, kv_heads, kept, key_dim)
    value_index = index.expand(batch, kv_heads, kept, values.shape[-1])
    return keys.gather(2, key_index), values.gather(2, value_index)


@dataclass(frozen=True)
class Selection:
    indices: torch.Tensor
    slot_valid: torch.Tensor
    length: int  # tokens in the layer before compression

    @classmethod
    def everything(cls, batch: int, length: int, device: torch.device | str, valid: torch.Tensor | None = None) -> "Selection":
        """The identity selection (used when a layer is passed through uncompressed)."""
        indices = torch.arange(length, device=device).expand(batch, 1, length)
        slot_valid = torch.ones(batch, 1, length, dtype=torch.bool, device=device) if valid is None else valid[:, None, :].bool()
        return cls(indices, slot_valid, length)

    @property
    def shared(self) -> bool:
        return self.indices.shape[1] == 1

    @property
    def kept_per_row(self) -> torch.Tensor:
        """Real tokens kept by each row (heads keep equal counts)."""
        return self.slot_valid[:, 0, :].sum(dim=-1)

    def kept_table(self) -> torch.Tensor:
        """``bool[B, Hs, T]``: True where a prefix position is kept (the mask-mode view)."""
        batch, heads, _ = self.indices.shape
        # Padding slots write into an extra column that is dropped, so they can't clear a kept one.
        table = torch.zeros(batch, heads, self.length + 1, dtype=torch.bool, device=self.indices.device)
        positions = torch.where(self.slot_valid, self.indices, self.length)
        return table.scatter_(-1, positions, True)[..., : self.length]

    def attention_mask(self) -> torch.Tensor:
        """``int64[B, K]`` mask of the compressed cache (0 on padding slots), for later forwards."""
        return self.slot_valid[:, 0, :].to(torch.int64)

    def apply(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict (physical): the compressed keys and values."""
        return gather_kv(keys, values, self.indices)

    def trimmed(self) -> "Selection":
        """Drop leading slots that are padding in every row (costs one host sync), all but one
        when the layer keeps no token at all (a pyramid budget of 0, a layer the global top-k
        starved): one hidden slot stays, so that an evicted layer never holds 0 slots.

        Why: a layer of 0 slots reads as an empty one (its next forward of Q tokens was taken
        for a prefill of Q tokens and compressed; a first layer of 0 slots made
        ``get_seq_length()`` 0, so nothing was routed), and ``Press.select``'s ``kept[..., -0:]``
        kept every gathered slot: position 0's key and value, visible to later tokens."""
        empty = min(int((~self.slot_valid).sum(dim=-1).min()), self.indices.shape[-1] - 1)
        if empty <= 0:
            return self
        return Selection(self.indices[..., empty:].contiguous(), self.slot_valid[..., empty:].contiguous(), self.length)

    def kept_sets(self) -> list[list[set[int]]]:
        """Python sets of kept positions per row and head (for inspection and tests)."""
        out = []
        for row_idx, row_valid in zip(self.indices.tolist(), self.slot_valid.tolist()):
            out.append([{i for i, ok in zip(head, oks) if ok} for head, oks in zip(row_idx, row_valid)])
        return out

"""The whole-cache stage: select once over every layer's scores, after the prefill.

Why a second path: the in-hook path decides layer by layer, so it never holds the whole
uncompressed cache, but it cannot compare layers. A ``global`` allocator (KVzip's default, arXiv
2505.23416) ranks the groups of every layer and head together, so it needs all scores first.
The hooks then only *score* each layer (``Press.score_layer``, the same scores the fused op
ranks); after the model's forward, :func:`select_globally` spends the whole budget in one top-k
and every layer is evicted once.

Memory: the full prefill cache is alive until the end of the forward (as without a press), plus
one ``float32[B, Hs, T]`` score tensor per layer. Cost: one extra top-k over ``L x Hs x T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .policies.selectors import select_pooled
from .selection import Selection

if TYPE_CHECKING:
    from .press import Press


@dataclass(frozen=True)
class LayerScores:
    """One layer's scores ``[B, Hs, T]`` and the row facts they were computed with."""

    scores: torch.Tensor
    valid: torch.Tensor
    group_extra: dict[str, torch.Tensor]


def select_globally(press: "Press", records: dict[int, LayerScores]) -> dict[int, Selection]:
    """Selections of every scored layer from one pooled top-k: each layer and head keeps its
    protected tokens, and together they keep exactly ``layers x heads x kept(T)`` tokens per row."""
    if not records:
        return {}
    order = sorted(records)
    first = records[order[0]]
    valid = first.valid
    batch, pools_per_layer, length = first.scores.shape
    if any(records[i].scores.shape != first.scores.shape for i in order):
        raise ValueError("the global allocator needs every compressed layer to hold the same tokens")
    rule, window, grouper, selector = press.rule, press.scorer.window, press.grouper, press.selector
    lengths = valid.sum(dim=-1)
    if rule.is_noop or length <= window or bool((rule.kept_tensor(lengths) >= lengths).all()):
        everything = Selection.everything(batch, length, valid.device, valid)
        return {i: everything for i in order}
    protected = selector.protected(valid, window)
    per_pool = torch.maximum(rule.kept_tensor(lengths), protected.sum(dim=-1))
    pools = pools_per_layer * len(order)
    stacked = torch.cat([records[i].scores.to(torch.float32) for i in order], dim=1)
    out = select_pooled(
        stacked, grouper.group_ids(valid, **first.group_extra), grouper.num_groups(length), valid, protected, per_pool * pools, grouper.reduce,
        press.allocator.pool_floor,
    )
    selections = {}
    for position, layer_idx in enumerate(order):
        span = slice(position * pools_per_layer, (position + 1) * pools_per_layer)
        selections[layer_idx] = Selection(out.indices[:, span], out.slot_valid[:, span], length).trimmed()
    return selections

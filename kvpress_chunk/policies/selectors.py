"""Selectors: token scores + groups + budget -> kept token indices.

The whole selection is one vectorised pass (no Python loop over chunks, no per-row loop), so it
traces into a single ``torch.compile(fullgraph=True)`` graph:

1. protected tokens (sinks, observation window) are marked; the rest are *candidates*;
2. group score = sum or mean of the candidates' token scores in the group;
3. groups are ranked by score (ties: earlier group first);
4. every token gets a sort key: protected first, then by its group's rank, then by position;
5. each row keeps the first ``n_keep`` tokens of that order, where ``n_keep`` is the budget
   (``fill="exact"``) or rounded down to whole groups (``fill="whole"``);
6. kept indices are sorted ascending. Rows that keep fewer tokens than the widest row are
   *left-padded* with index ``-1`` (``slot_valid=False``), the same convention as HF's left
   padding, so generation can continue with a 2-D attention mask.

With ``fill="exact"`` at most one group (the last one admitted) is kept partially: its earliest
tokens. Every other group is kept whole or dropped whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..budget import Budget
from ..registry import register
from .groupers import positions_from_row_start
from .validation import check_bool, check_choice, check_int

FILLS = ("exact", "whole")
COUNTS = ("tokens", "groups")


class SelectionTensors(NamedTuple):
    """Raw output of a selector: ``indices[B, Hs, K]`` (``-1`` where ``slot_valid`` is False)."""

    indices: torch.Tensor
    slot_valid: torch.Tensor


class SelectionRequest(NamedTuple):
    """Everything a selector needs for one layer, passed as one value (traced by torch.compile).

    ``scores[B, Hkv, T]``, ``group_ids[B, T]`` (padding in bucket ``num_groups``), ``valid[B, T]``,
    the scorer's observation ``window``, ``keep(counts[B]) -> kept[B]`` (the press budget rule, or
    the allocator's per-layer budget), the grouper's ``reduce``, the static ``capacity`` (slots per
    row and head), ``pool_heads`` (the allocator pools the heads' budgets: AdaKV) and
    ``pool_floor`` (the share of its free budget each pooled head is guaranteed)."""

    scores: torch.Tensor
    group_ids: torch.Tensor
    num_groups: int
    valid: torch.Tensor
    window: int
    keep: Callable[[torch.Tensor], torch.Tensor]
    reduce: str
    capacity: int
    pool_heads: bool = False
    pool_floor: float = 0.0


class Selector:
    """Base class: frozen dataclasses registered with ``@register("selector", name)``.

    Declared capabilities, checked by the press against its other parts and its apply mode:
    ``ragged_heads`` (KV heads may keep different token counts) and ``needs_ratio`` (the budget
    must be a compression ratio, not a token count)."""

    per_head: bool = False
    ragged_heads: bool = False

    @property
    def needs_ratio(self) -> bool:
        return False

    def capacity(self, length: int, window: int, budget: Budget, max_group_size: int, num_groups: int) -> int:
        """Static upper bound (Python int) on kept tokens per row, used to size top-k."""
        raise NotImplementedError

    def protected_count(self, window: int) -> int:
        """Tokens per row and head that are always kept (sinks, the observation window)."""
        return 0

    def select(self, request: SelectionRequest) -> SelectionTensors:
        """Kept indices ``[B, Hs, K]`` for one layer (see :class:`SelectionRequest`)."""
        raise NotImplementedError


def protected_mask(valid: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """Real tokens that must stay: the first ``sinks`` and the last ``recent`` of each row."""
    length = valid.shape[-1]
    local = positions_from_row_start(valid)
    positions = torch.arange(length, device=valid.device)
    return valid & ((local < sinks) | (positions >= length - recent))


def rank_groups(
    scores: torch.Tensor, group_ids: torch.Tensor, num_groups: int, candidates: torch.Tensor, reduce: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank groups by the sum, mean or max of their candidates' scores.

    Returns ``(order, rank, sizes)``: ``order[..., i]`` is the group ranked ``i``;
    ``rank[..., g]`` the rank of group ``g``; ``sizes[B, 1, G+1]`` the candidate count per group.
    Groups without candidates (fully protected, padding bucket) rank last.
    """
    batch, heads, _ = scores.shape
    ids = group_ids.unsqueeze(1)
    weight = candidates.unsqueeze(1).to(scores.dtype)
    sizes = scores.new_zeros(batch, 1, num_groups + 1).scatter_add_(-1, ids, weight)
    if reduce == "max":
        candidate_scores = torch.where(candidates.unsqueeze(1), scores, float("-inf"))
        group_scores = scores.new_full((batch, heads, num_groups + 1), float("-inf")).scatter_reduce_(
            -1, ids.expand_as(scores), candidate_scores, reduce="amax"
        )
    else:
        totals = scores.new_zeros(batch, heads, num_groups + 1).scatter_add_(-1, ids.expand_as(scores), scores * weight)
        group_scores = totals / sizes.clamp(min=1) if reduce == "mean" else totals
    group_scores = group_scores.masked_fill(sizes == 0, float("-inf"))
    order = torch.argsort(group_scores, dim=-1, descending=True, stable=True)
    ranks = torch.arange(num_groups + 1, device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    return order, rank, sizes


def select_topk(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    valid: torch.Tensor,
    protected: torch.Tensor,
    n_keep: torch.Tensor | None,
    n_groups_keep: torch.Tensor | None,
    capacity: int,
    reduce: str,
    fill: str,
    spiky_keep: int = 0,
) -> SelectionTensors:
    """Pure, compile-friendly group top-k (see module docstring for the rule).

    ``scores[B, H, T]`` (H = 1 for a selection shared by all heads), ``group_ids[B, T]``,
    ``valid``/``protected`` ``[B, T]``. Exactly one of ``n_keep[B]`` (tokens per row, protected
    included) and ``n_groups_keep[B]`` (groups per row, on top of protected tokens) is given.
    ``spiky_keep > 0`` gates groups by entropy (:func:`spiky_group_order`; ``fill="exact"`` only).
    """
    batch, heads, length = scores.shape
    candidates = valid & ~protected
    order, rank, sizes = rank_groups(scores, group_ids, num_groups, candidates, reduce)

    n_protected = protected.sum(dim=-1).unsqueeze(-1)  # [B, 1]
    cumulative = sizes.expand(batch, heads, -1).gather(-1, order).cumsum(dim=-1).to(torch.int64)  # [B, H, G+1]
    if n_groups_keep is not None:
        take = n_groups_keep.unsqueeze(-1).expand(batch, heads).unsqueeze(-1)  # [B, H, 1]
        extra = torch.where(take > 0, cumulative.gather(-1, (take - 1).clamp(min=0)), 0).squeeze(-1)
    else:
        extra = (n_keep.unsqueeze(-1) - n_protected).clamp(min=0).expand(batch, heads)  # [B, H]
        if fill == "whole":
            fits = cumulative <= extra.unsqueeze(-1)
            extra = torch.where(fits, cumulative, 0).amax(dim=-1)
    total = n_protected + extra  # [B, H]

    positions = torch.arange(length, device=scores.device)
    token_rank = rank.gather(-1, group_ids.unsqueeze(1).expand(batch, heads, length))
    key = token_rank * length + positions
    if spiky_keep:
        within, demoted, score_rank = spiky_group_order(scores, group_ids, num_groups, candidates, sizes, spiky_keep)
        key = torch.where(within >= 0, token_rank * length + within, key)
        key = torch.where(demoted, (num_groups + 1) * length + score_rank, key)
    key = torch.where(protected.unsqueeze(1), positions - length, key)
    key = torch.where(valid.unsqueeze(1), key, (num_groups + 2) * length + positions)
    first = torch.topk(-key, capacity, dim=-1, sorted=True).indices  # best first
    slot = torch.arange(capacity, device=scores.device)
    kept = slot < total.unsqueeze(-1)
    indices = torch.where(kept, first, -1).sort(dim=-1).values
    return SelectionTensors(indices, indices >= 0)


def spiky_group_order(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    candidates: torch.Tensor,
    sizes: torch.Tensor,
    spiky_keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy gate (kvpress' EntropyGatedChunkKV rule, vectorised and per row): a group whose
    mean score is at least the median group's and whose normalised score entropy is below the
    median is *spiky* (its importance sits in a few tokens). Its best ``spiky_keep`` tokens keep the
    group's rank, ordered by score; its other tokens are demoted behind every ordinary token, so
    the budget they would have taken admits further groups (the total stays exact).

    Returns ``within[B, H, T]`` (score rank inside a spiky group for its kept tokens, else -1),
    ``demoted[B, H, T]`` and ``score_rank[B, H, T]`` (global score rank, orders demoted tokens).
    """
    batch, heads, length = scores.shape
    ids = group_ids.unsqueeze(1).expand(batch, heads, length)
    weight = candidates.unsqueeze(1).to(scores.dtype)
    masked = torch.where(candidates.unsqueeze(1), scores, float("inf"))
    low = scores.new_full((batch, heads, num_groups + 1), float("inf")).scatter_reduce(-1, ids, masked, reduce="amin")
    shifted = (scores - low.gather(-1, ids).clamp(max=0)) * weight  # non-negative inside each group
    totals = scores.new_zeros(batch, heads, num_groups + 1).scatter_add_(-1, ids, shifted)
    prob = shifted / (totals.gather(-1, ids) + 1e-8)
    plogp = torch.where(prob > 0, prob * prob.clamp(min=1e-30).log(), 0.0)
    entropy = -scores.new_zeros(batch, heads, num_groups + 1).scatter_add_(-1, ids, plogp)
    counts = sizes.expand(batch, heads, -1)
    entropy = torch.where(counts > 1, entropy / counts.clamp(min=2).log(), 0.0).clamp(0, 1)
    means = scores.new_zeros(batch, heads, num_groups + 1).scatter_add_(-1, ids, scores * weight) / counts.clamp(min=1)
    real = counts > 0
    real[..., -1] = False  # the padding bucket
    nan = torch.full_like(means, float("nan"))
    mean_median = torch.where(real, means, nan).nanmedian(dim=-1, keepdim=True).values
    entropy_median = torch.where(real, entropy, nan).nanmedian(dim=-1, keepdim=True).values
    spiky = real & (means >= mean_median) & (entropy < entropy_median)  # [B, H, G+1]
    # Score rank of each candidate inside its group: sort by score, then (stably) by group.
    by_score = torch.argsort(torch.where(candidates.unsqueeze(1), scores, float("-inf")), dim=-1, descending=True, stable=True)
    by_group = torch.argsort(ids.gather(-1, by_score), dim=-1, stable=True)
    order = by_score.gather(-1, by_group)  # tokens grouped, best first inside each group
    group_sizes = torch.zeros(batch, heads, num_groups + 1, dtype=torch.int64, device=scores.device).scatter_add_(
        -1, ids, torch.ones_like(ids)
    )
    first_slot = torch.cumsum(group_sizes, dim=-1) - group_sizes  # [B, H, G+1]
    slot = torch.arange(length, device=scores.device).expand(batch, heads, length)
    rank_sorted = slot - first_slot.gather(-1, ids.gather(-1, order))
    rank_in_group = torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)
    in_spiky = spiky.gather(-1, ids) & candidates.unsqueeze(1)
    demoted = in_spiky & (rank_in_group >= spiky_keep)
    within = torch.where(in_spiky & ~demoted, rank_in_group, -1)
    score_rank = torch.empty_like(by_score).scatter_(-1, by_score, slot)
    return within, demoted, score_rank


@register("selector", "topk")
@dataclass(frozen=True)
class TopKSelector(Selector):
    """Keep the best groups until the budget is spent.

    * ``per_head``: one selection per KV head (scores per head) instead of one shared by all
      heads of the layer (scores summed over heads, as kvpress' ChunkKV does).
    * ``sinks``: first real tokens of each row always kept (StreamingLLM's attention sinks).
    * ``keep_window``: always keep the scorer's observation window (ChunkKV paper, Alg. 1).
    * ``fill``: ``"exact"`` spends the budget exactly (the last admitted group may be cut);
      ``"whole"`` keeps whole groups only, rounding the budget down.
    * ``count``: ``"tokens"`` (the budget counts tokens) or ``"groups"`` (``compression_ratio``
      applies to the number of groups: kvpress' ChunkKVPress rule ``max(1, int(n * (1 - r)))``).
    """

    per_head: bool = False
    sinks: int = 0
    keep_window: bool = True
    fill: str = "exact"
    count: str = "tokens"

    def __post_init__(self) -> None:
        check_bool(self, "per_head")
        check_int(self, "sinks", minimum=0, meaning="first tokens always kept")
        check_bool(self, "keep_window")
        check_choice(self, "fill", FILLS)
        check_choice(self, "count", COUNTS)
        if self.per_head and (self.fill != "exact" or self.count != "tokens"):
            # Heads would keep different counts, which a single 2-D attention mask cannot express.
            raise ValueError("per_head=True needs fill='exact' and count='tokens' (equal kept counts per head)")

    @property
    def needs_ratio(self) -> bool:
        return self.count == "groups"

    def protected_count(self, window: int) -> int:
        return self.sinks + (window if self.keep_window else 0)

    def capacity(self, length: int, window: int, budget: Budget, max_group_size: int, num_groups: int) -> int:
        protected = self.protected_count(window)
        if self.count == "groups":
            if budget.compression_ratio is None:
                raise ValueError("count='groups' needs a compression_ratio, not a token budget")
            wanted = protected + budget.kept(num_groups) * max_group_size
        else:
            wanted = max(budget.kept(length), protected)
        # A row not longer than the window is kept whole, so room for `window` tokens is needed.
        return min(length, max(wanted, window))

    def protected(self, valid: torch.Tensor, window: int) -> torch.Tensor:
        """``bool[B, T]``: sinks, the window if kept, and whole rows not longer than the window."""
        protected = protected_mask(valid, self.sinks, window if self.keep_window else 0)
        short_row = valid.sum(dim=-1) <= window  # nothing to observe from: kept whole
        return protected | (short_row.unsqueeze(-1) & valid)

    def select(self, request: SelectionRequest) -> SelectionTensors:
        scores, group_ids, num_groups, valid, window, keep, reduce, capacity, pool_heads, pool_floor = request
        lengths = valid.sum(dim=-1)
        protected = self.protected(valid, window)
        if pool_heads:
            return select_pooled(
                scores, group_ids, num_groups, valid, protected, keep(lengths) * scores.shape[1], reduce, pool_floor
            )
        if not self.per_head:
            scores = scores.sum(dim=1, keepdim=True)
        n_keep = n_groups_keep = None
        if self.count == "groups":
            short_row = lengths <= window
            members = torch.zeros(valid.shape[0], num_groups + 1, device=valid.device, dtype=torch.int64)
            members = members.scatter_add_(-1, group_ids, (valid & ~protected).to(torch.int64))[:, :num_groups]
            n_groups = (members > 0).sum(dim=-1)
            n_groups_keep = torch.where(short_row, 0, keep(n_groups))
        else:
            n_keep = keep(lengths)
        return select_topk(scores, group_ids, num_groups, valid, protected, n_keep, n_groups_keep, capacity, reduce, self.fill)


def select_pooled(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    valid: torch.Tensor,
    protected: torch.Tensor,
    n_keep_total: torch.Tensor,
    reduce: str,
    floor: float = 0.0,
) -> SelectionTensors:
    """Pools share one budget: ``scores[B, P, T]`` (P = heads of a layer, or layers x heads for
    the global allocator). Every pool keeps its protected tokens; the rest of ``n_keep_total[B]``
    goes to the best groups of all pools ranked together (groups of different pools never merge).
    ``floor`` in [0, 1]: each pool first keeps its own best ``floor`` share of an even split of
    the free budget (:func:`pool_floor_mask`, AdaKV's safeguard). Returns ``[B, P, K]`` kept
    indices per pool, left-padded with -1 (counts differ per pool)."""
    batch, pools, length = scores.shape
    pooled_protected = protected.unsqueeze(1).expand(batch, pools, length)
    if floor > 0:
        pooled_protected = pooled_protected | pool_floor_mask(
            scores, group_ids, num_groups, valid & ~protected, n_keep_total, protected.sum(dim=-1), reduce, floor
        )
    offsets = (torch.arange(pools, device=scores.device) * (num_groups + 1))[None, :, None]
    flat_ids = (group_ids.unsqueeze(1) + offsets).reshape(batch, pools * length)
    flat = select_topk(
        scores.reshape(batch, 1, pools * length), flat_ids, pools * (num_groups + 1), valid.repeat(1, pools),
        pooled_protected.reshape(batch, pools * length), n_keep_total, None, pools * length, reduce, "exact",
    )
    # Back to one row of kept positions per pool, left-padded with -1.
    table = torch.zeros(batch, pools * length + 1, dtype=torch.bool, device=scores.device)
    table = table.scatter_(-1, torch.where(flat.slot_valid[:, 0], flat.indices[:, 0], pools * length), True)
    table = table[:, :-1].view(batch, pools, length)
    positions = torch.arange(length, device=scores.device)
    indices = torch.where(table, positions, -1).sort(dim=-1).values
    return SelectionTensors(indices, indices >= 0)


def pool_floor_mask(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    candidates: torch.Tensor,
    n_keep_total: torch.Tensor,
    n_protected: torch.Tensor,
    reduce: str,
    floor: float,
) -> torch.Tensor:
    """``bool[B, P, T]``: each pool's first ``int(floor * free)`` candidate tokens in its own
    group order (best group first, the last one cut), ``free`` being an even split of the budget
    left after protected tokens.

    Why: ranked together, the pools of a global (layers x heads) or head-adaptive budget can
    leave a layer or head almost empty, and every later token then attends through it. AdaKV
    (kvpress' ``alpha_safeguard=0.2``) guarantees each head a share first. These tokens count
    inside the budget, which stays exact."""
    batch, pools, length = scores.shape
    _, rank, _ = rank_groups(scores, group_ids, num_groups, candidates, reduce)
    positions = torch.arange(length, device=scores.device)
    token_rank = rank.gather(-1, group_ids.unsqueeze(1).expand(batch, pools, length))
    key = torch.where(candidates.unsqueeze(1), token_rank * length + positions, (num_groups + 2) * length + positions)
    place = torch.empty_like(key).scatter_(-1, key.argsort(dim=-1), positions.expand_as(key))  # rank in the pool
    free = (n_keep_total // pools - n_protected).clamp(min=0)  # [B]
    guaranteed = (free.to(torch.float32) * floor).floor().to(torch.int64)
    return (place < guaranteed[:, None, None]) & candidates.unsqueeze(1)


@register("selector", "entropy-gated")
@dataclass(frozen=True)
class EntropyGatedSelector(TopKSelector):
    """Top-k of groups with an entropy gate (kvpress' EntropyGatedChunkKV, per row and head):
    an important group whose score sits in a few tokens keeps only its best ``spiky_keep``
    tokens, and the budget freed admits more groups. Exact total budget (``fill='exact'``)."""

    spiky_keep: int = 4

    def __post_init__(self) -> None:
        TopKSelector.__post_init__(self)
        check_int(self, "spiky_keep", minimum=1, meaning="tokens a spiky group keeps")
        if self.fill != "exact" or self.count != "tokens":
            raise ValueError("the entropy-gated selector needs fill='exact' and count='tokens'")

    def select(self, request: SelectionRequest) -> SelectionTensors:
        scores, group_ids, num_groups, valid, window, keep, reduce, capacity, pool_heads, _ = request
        if pool_heads:
            raise ValueError("the entropy-gated selector does not pool heads' budgets (use the uniform allocator)")
        protected = self.protected(valid, window)
        if not self.per_head:
            scores = scores.sum(dim=1, keepdim=True)
        return select_topk(
            scores, group_ids, num_groups, valid, protected, keep(valid.sum(dim=-1)), None, capacity, reduce, "exact",
            spiky_keep=self.spiky_keep,
        )


@register("selector", "adaptive")
@dataclass(frozen=True)
class HeadAdaptiveSelector(TopKSelector):
    """Head-adaptive budgets (AdaKV, arXiv 2407.11550): one layer budget, spent unevenly.

    Every KV head keeps its protected tokens; the remaining ``Hkv * (n_keep - protected)``
    tokens go to the best groups of *all* heads ranked together, so heads with concentrated
    attention give budget to heads that need more. The layer keeps exactly ``Hkv * n_keep``
    tokens; per-head counts differ, so it needs ``apply="mask"`` (an evicted cache would be
    ragged across heads). For a per-head floor (AdaKV's safeguard) use the ``adaptive`` allocator.
    """

    per_head: bool = True
    ragged_heads = True  # class attribute, not a setting

    def __post_init__(self) -> None:
        check_bool(self, "per_head")  # the types first: per_head=1 is not True
        check_choice(self, "fill", FILLS)
        check_choice(self, "count", COUNTS)
        if not self.per_head or self.fill != "exact" or self.count != "tokens":
            raise ValueError("the adaptive selector is per-head with fill='exact' and count='tokens'")
        TopKSelector.__post_init__(self)

    def capacity(self, length: int, window: int, budget: Budget, max_group_size: int, num_groups: int) -> int:
        # Per head: at most every token. The op trims all-padding columns afterwards.
        return length

    def select(self, request: SelectionRequest) -> SelectionTensors:
        return TopKSelector.select(self, request._replace(pool_heads=True))

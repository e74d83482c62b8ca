"""Invariants of the selection op, property-tested with hypothesis against a plain-Python oracle.

Scores are small integers (exact in float32), so the oracle and the vectorised op must agree
exactly, including tie-breaking (equal groups: the earlier one wins).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpress_chunk.budget import Budget
from kvpress_chunk.policies import ChunkGrouper, TokenGrouper, TopKSelector
from kvpress_chunk.policies.selectors import SelectionRequest
from kvpress_chunk.selection import Selection


def run_selector(scores, valid, grouper, selector, budget, window) -> Selection:
    length = scores.shape[-1]
    capacity = selector.capacity(length, window, budget, grouper.max_group_size, grouper.num_groups(length))
    out = selector.select(SelectionRequest(
        scores, grouper.group_ids(valid), grouper.num_groups(length), valid, window, budget.kept_tensor,
        grouper.reduce, capacity,
    ))
    return Selection(out.indices, out.slot_valid, length).trimmed()


def oracle(row_scores: list[float], chunk: int, selector: TopKSelector, budget: Budget, window: int, reduce: str) -> set[int]:
    """The selection rule written as the obvious loop, for one unpadded row and one head."""
    length = len(row_scores)
    if length <= window:
        return set(range(length))
    recent = window if selector.keep_window else 0
    protected = set(range(min(selector.sinks, length))) | set(range(length - recent, length))
    members: dict[int, list[int]] = {}
    for t in range(length):
        if t not in protected:
            members.setdefault(t // chunk, []).append(t)
    def group_score(g):
        if reduce == "max":
            return max(row_scores[t] for t in members[g])
        total = sum(row_scores[t] for t in members[g])
        return total / len(members[g]) if reduce == "mean" else total
    ranked = sorted(members, key=lambda g: (-group_score(g), g))
    kept = set(protected)
    if selector.count == "groups":
        for g in ranked[: budget.kept(len(members))]:
            kept.update(members[g])
        return kept
    room = max(budget.kept(length), len(protected)) - len(protected)
    for g in ranked:
        if room <= 0:
            break
        if selector.fill == "whole" and len(members[g]) > room:
            break
        taken = members[g][:room]
        kept.update(taken)
        room -= len(taken)
    return kept


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 90))
    per_head = draw(st.booleans())
    count = "tokens" if per_head else draw(st.sampled_from(["tokens", "groups"]))
    fill = "exact" if per_head else draw(st.sampled_from(["exact", "whole"]))
    selector = TopKSelector(
        per_head=per_head, sinks=draw(st.integers(0, 6)), keep_window=draw(st.booleans()), fill=fill, count=count
    )
    if count == "groups" or draw(st.booleans()):
        budget = Budget(compression_ratio=draw(st.sampled_from([0.0, 0.1, 0.5, 0.75, 0.9, 0.99])))
    else:
        budget = Budget(budget=draw(st.integers(1, 100)))
    chunk = draw(st.integers(1, 12))
    grouper = ChunkGrouper(size=chunk, reduce=draw(st.sampled_from(["sum", "mean", "max"]))) if chunk > 1 else TokenGrouper()
    window = draw(st.integers(0, 20))
    heads = draw(st.integers(1, 3))
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    pads[draw(st.integers(0, batch - 1))] = 0  # like a real left-padded batch: one row is full
    seed = draw(st.integers(0, 2**16))
    return batch, length, heads, selector, budget, grouper, window, pads, seed


def make_inputs(batch, length, heads, pads, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 50, (batch, heads, length), generator=generator).float()
    positions = torch.arange(length)
    valid = positions[None, :] >= torch.tensor(pads)[:, None]
    return scores, valid


@given(cases())
def test_selection_matches_oracle_and_invariants(case):
    batch, length, heads, selector, budget, grouper, window, pads, seed = case
    scores, valid = make_inputs(batch, length, heads, pads, seed)
    selection = run_selector(scores, valid, grouper, selector, budget, window)
    chunk = grouper.max_group_size
    expected_heads = heads if selector.per_head else 1
    assert selection.indices.shape[:2] == (batch, expected_heads)

    for row in range(batch):
        pad, real = pads[row], length - pads[row]
        row_scores = scores[row, :, pad:]
        head_scores = row_scores if selector.per_head else row_scores.sum(dim=0, keepdim=True)
        for head in range(expected_heads):
            slots = selection.indices[row, head]
            ok = selection.slot_valid[row, head]
            kept = slots[ok]
            # Sorted, unique, in range, never padding; padding slots only on the left.
            assert torch.all(kept[1:] > kept[:-1])
            assert bool((kept >= pad).all()) and bool((kept < length).all())
            assert bool((slots[~ok] == -1).all())
            if (~ok).any():
                assert int((~ok).nonzero().max()) < int(ok.nonzero().min()) if ok.any() else True
            local = {int(t) - pad for t in kept}
            want = oracle(head_scores[head].tolist(), chunk, selector, budget, window, grouper.reduce)
            assert local == want
            # Kept count: the budget exactly (exact fill), protected tokens always in.
            recent = window if selector.keep_window else 0
            protected = set(range(min(selector.sinks, real))) | set(range(max(real - recent, 0), real))
            assert protected <= local
            if real <= window:
                assert local == set(range(real))
            elif selector.count == "tokens":
                target = min(real, max(budget.kept(real), len(protected)))
                assert len(local) == target if selector.fill == "exact" else len(local) <= target
            # Chunk integrity: every chunk's unprotected tokens are all kept or all dropped,
            # except at most one (the last admitted) with fill="exact".
            partial = 0
            for start in range(0, real, chunk):
                members = set(range(start, min(start + chunk, real))) - protected
                taken = members & local
                if taken and taken != members:
                    partial += 1
                    assert taken == set(sorted(members)[: len(taken)])  # earliest tokens first
            assert partial <= (1 if selector.fill == "exact" and selector.count == "tokens" else 0)


@given(cases())
def test_each_batch_row_gets_what_it_gets_alone(case):
    batch, length, heads, selector, budget, grouper, window, pads, seed = case
    scores, valid = make_inputs(batch, length, heads, pads, seed)
    together = run_selector(scores, valid, grouper, selector, budget, window)
    for row in range(batch):
        pad = pads[row]
        alone_scores = scores[row : row + 1, :, pad:]
        alone_valid = torch.ones(1, length - pad, dtype=torch.bool)
        alone = run_selector(alone_scores, alone_valid, grouper, selector, budget, window)
        for head in range(together.indices.shape[1]):
            mine = together.indices[row, head][together.slot_valid[row, head]] - pad
            assert torch.equal(mine, alone.indices[0, head][alone.slot_valid[0, head]])


@given(st.integers(1, 60), st.integers(1, 8), st.integers(0, 2**16))
def test_keeping_everything_is_the_identity(length, chunk, seed):
    scores, valid = make_inputs(2, length, 2, [0, 0], seed)
    selection = run_selector(scores, valid, ChunkGrouper(size=chunk), TopKSelector(), Budget(budget=length), 0)
    assert torch.equal(selection.indices, torch.arange(length).expand(2, 1, length))
    keys = torch.randn(2, 2, length, 4)
    values = torch.randn(2, 2, length, 4)
    kept_keys, kept_values = selection.apply(keys, values)
    assert torch.equal(kept_keys, keys) and torch.equal(kept_values, values)


@given(
    st.integers(1, 3), st.integers(20, 120), st.integers(2, 4), st.integers(1, 12), st.integers(0, 16),
    st.sampled_from([0.5, 0.75, 0.9]), st.integers(0, 2**16),
)
def test_head_adaptive_selector_spends_the_layer_budget_across_heads(batch, length, heads, chunk, window, ratio, seed):
    from kvpress_chunk.policies import HeadAdaptiveSelector

    selector = HeadAdaptiveSelector(sinks=2)
    budget = Budget(compression_ratio=ratio)
    pads = [0] + [seed % (length // 2) for _ in range(batch - 1)]
    scores, valid = make_inputs(batch, length, heads, pads, seed)
    grouper = ChunkGrouper(size=chunk) if chunk > 1 else TokenGrouper()
    together = run_selector(scores, valid, grouper, selector, budget, window)
    for row in range(batch):
        real = length - pads[row]
        counts = together.slot_valid[row].sum(dim=-1)
        protected = set(range(min(2, real))) | set(range(max(real - window, 0), real))
        if real <= window:
            assert counts.tolist() == [real] * heads
            continue
        per_head_budget = max(budget.kept(real), len(protected))
        assert int(counts.sum()) == heads * min(real, per_head_budget)  # the layer budget, exactly
        for head in range(heads):
            kept = {int(t) - pads[row] for t in together.indices[row, head][together.slot_valid[row, head]]}
            assert protected <= kept
        alone = run_selector(scores[row : row + 1, :, pads[row]:], torch.ones(1, real, dtype=torch.bool), grouper, selector, budget, window)
        for head in range(heads):
            mine = together.indices[row, head][together.slot_valid[row, head]] - pads[row]
            assert torch.equal(mine, alone.indices[0, head][alone.slot_valid[0, head]])


def test_head_adaptive_budgets_really_differ_across_heads():
    from kvpress_chunk.policies import HeadAdaptiveSelector

    scores = torch.zeros(1, 2, 40)
    scores[0, 0, 10:30] = 5.0  # head 0 has the important tokens
    selection = run_selector(scores, torch.ones(1, 40, dtype=torch.bool), TokenGrouper(), HeadAdaptiveSelector(), Budget(compression_ratio=0.5), 0)
    counts = selection.slot_valid[0].sum(dim=-1).tolist()
    assert sum(counts) == 40 and counts[0] > counts[1]


def entropy_gated_oracle(row: list[float], chunk: int, keep_spiky: int, budget: int, recent: int) -> set[int]:
    """The entropy gate as the obvious loop (one unpadded row, one head, no sinks)."""
    import math

    length = len(row)
    protected = set(range(length - recent, length))
    members: dict[int, list[int]] = {}
    for t in range(length):
        if t not in protected:
            members.setdefault(t // chunk, []).append(t)
    total = {g: sum(row[t] for t in m) for g, m in members.items()}
    mean = {g: total[g] / len(m) for g, m in members.items()}

    def entropy(g):
        m = members[g]
        if len(m) < 2:
            return 0.0
        low = min(0.0, min(row[t] for t in m))
        shifted = [row[t] - low for t in m]
        s = sum(shifted) + 1e-8
        return min(1.0, max(0.0, -sum(p * math.log(p) for p in (x / s for x in shifted) if p > 0) / math.log(len(m))))

    ent = {g: entropy(g) for g in members}
    lower_median = lambda values: sorted(values)[(len(values) - 1) // 2]  # noqa: E731 (torch.nanmedian's rule)
    mean_median, entropy_median = lower_median(list(mean.values())), lower_median(list(ent.values()))
    spiky = {g for g in members if mean[g] >= mean_median and ent[g] < entropy_median}
    ranked = sorted(members, key=lambda g: (-total[g], g))
    order = []
    for g in ranked:
        tokens = members[g]
        order += sorted(tokens, key=lambda t: (-row[t], t))[:keep_spiky] if g in spiky else tokens
    demoted = [t for g in spiky for t in sorted(members[g], key=lambda t: (-row[t], t))[keep_spiky:]]
    order += sorted(demoted, key=lambda t: (-row[t], t))
    room = max(budget, len(protected)) - len(protected)
    return protected | set(order[:room])


@given(
    st.integers(1, 3), st.integers(12, 90), st.integers(2, 8), st.integers(1, 4), st.integers(0, 8),
    st.sampled_from([0.5, 0.75, 0.9]), st.integers(0, 2**16),
)
def test_entropy_gated_selection_matches_oracle_with_an_exact_budget(batch, length, chunk, keep_spiky, window, ratio, seed):
    from kvpress_chunk.policies.selectors import EntropyGatedSelector

    selector = EntropyGatedSelector(spiky_keep=keep_spiky)
    budget = Budget(compression_ratio=ratio)
    pads = [0] + [(seed >> row) % (length // 3) for row in range(1, batch)]
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, 1, length, generator=generator) ** 4  # skewed: some chunks are spiky
    valid = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    selection = run_selector(scores, valid, ChunkGrouper(size=chunk), selector, budget, window)
    for row in range(batch):
        pad, real = pads[row], length - pads[row]
        kept = selection.indices[row, 0][selection.slot_valid[row, 0]]
        local = {int(t) - pad for t in kept}
        if real <= window:
            assert local == set(range(real))
            continue
        want = entropy_gated_oracle(scores[row, 0, pad:].tolist(), chunk, keep_spiky, budget.kept(real), window)
        assert local == want
        assert len(local) == max(budget.kept(real), min(window, real))  # exactly the budget

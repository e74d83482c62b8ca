"""Allocators (uniform, pyramid, adaptive, global), ragged per-head eviction, the whole-cache
stage, and the spec round trip of every preset.

The invariant every allocator keeps: over the whole cache a row keeps exactly
``layers x heads x kept(T)`` tokens (protected tokens included), whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpress_chunk as kc
from kvpress_chunk.generation import greedy_continue, prefill
from kvpress_chunk.policies import Scorer
from kvpress_chunk.policies.allocators import pyramid_budgets
from tiny_models import make_tiny_model

LAYERS = 6


@given(
    kept=st.integers(1, 400), protected=st.integers(0, 64), extra=st.integers(0, 400),
    layers=st.integers(1, 32), spread=st.floats(0, 0.99),
)
def test_pyramid_budgets_keep_the_total_and_decrease_with_depth(kept, protected, extra, layers, spread):
    length = kept + extra
    budgets = pyramid_budgets(kept, protected, length, layers, spread)
    assert sum(budgets) == layers * kept
    assert all(min(protected, kept) <= b <= max(length, kept) for b in budgets)
    assert all(a >= b - 1 for a, b in zip(budgets, budgets[1:]))  # non-increasing (rounding: +-1)


def left_padded(lengths, seed=0):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(seed + n))
        mask[r, width - n:] = 1
    return ids, mask


def kept_per_row(session, heads):
    """Real tokens kept per row over every layer and head."""
    total = None
    for selection in session.selections.values():
        per_head = selection.slot_valid.sum(dim=-1)  # [B, Hs]
        row = per_head.sum(dim=-1) * (heads if selection.shared else 1)
        total = row if total is None else total + row
    return total


ALLOCATOR_PRESETS = [
    ("chunkkv", {}),  # uniform
    ("pyramidkv", {}),
    ("adakv", {}),
    ("chunkkv-adaptive", {}),
    ("chunkkv-global", {}),
    ("chunkkv-global", {"chunk_size": 1}),
]


@pytest.mark.parametrize("preset,params", ALLOCATOR_PRESETS)
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_every_allocator_keeps_exactly_the_press_budget_over_the_whole_cache(preset, params, ratio):
    model = make_tiny_model("llama", num_layers=LAYERS)
    heads = model.config.num_key_value_heads
    press = kc.make_press(preset, compression_ratio=ratio, compile=False, **params)
    lengths = [200, 137, 90]
    ids, mask = left_padded(lengths)
    with press(model) as session:
        prefill(model, ids, mask)
    protected = press.selector.protected_count(press.scorer.window)
    want = [LAYERS * heads * max(press.rule.kept(n), min(protected, n)) for n in lengths]
    assert kept_per_row(session, heads).tolist() == want
    for selection in session.selections.values():  # padding is never kept
        for r, n in enumerate(lengths):
            assert bool((selection.indices[r][selection.slot_valid[r]] >= max(lengths) - n).all())



def test_a_planner_that_shares_selections_is_refused_with_per_layer_budgets():
    """A layer that reuses another's selection keeps that layer's budget, so under the pyramid
    allocator the reusing layers kept their leader's (larger) share instead of their own: the
    cache kept more than ``layers x heads x kept`` without a word."""
    spec = {"preset": "pyramidkv", "planner": "reuse(every=2)", "compression_ratio": 0.75, "compile": False}
    with pytest.raises(kc.SpecError, match="pyramid allocator.*reuse planner"):
        kc.make_press(spec)
    with pytest.raises(kc.SpecError, match="pyramid allocator.*reuse planner"):
        kc.make_press({**spec, "decoding": {"every": 8, "max_cache": 96}})
    kc.make_press({**spec, "planner": "reuse(every=1)"})  # every layer selects: nothing shared


@pytest.mark.parametrize("planner", ["every_layer", "reuse(every=1)", "reuse(every=2)", "reuse(every=3)"])
def test_planners_declare_whether_they_share_selections_as_their_layers_do(planner):
    """The declared ``shares_selections`` (what the refusal above reads) agrees with the
    planner's own layer map, the base class's probe."""
    from kvpress_chunk.policies.planners import Planner
    from kvpress_chunk.registry import build_part

    part = build_part("planner", planner)
    assert part.shares_selections == Planner.shares_selections.fget(part)
    assert part.shares_selections == (planner in ("reuse(every=2)", "reuse(every=3)"))


def test_one_ranking_over_every_layer_is_refused_with_groups_of_unequal_size():
    """The global allocator ranks each group's first layer only; its tokens then count once per
    layer of the group. 5 layers in groups of 2, 2 and 1 kept 906 tokens instead of 1000."""
    press = kc.make_press({"preset": "chunkkv-global", "planner": "reuse(every=2)", "compression_ratio": 0.75,
                           "compile": False})
    with pytest.raises(kc.SpecError, match=r"groups of layers sharing a selection differ in size \(\[2, 2, 1\]"):
        with press(make_tiny_model("llama", num_layers=5)):
            pass


@pytest.mark.parametrize("spec", [
    {"preset": "chunkkv", "planner": "reuse(every=2)"},
    {"preset": "chunkkv-adaptive", "planner": "reuse(every=2)"},
    {"preset": "chunkkv-global", "planner": "reuse(every=2)"},  # 6 layers: groups of equal size
])
def test_shared_selections_keep_the_budget_with_allocators_that_size_layers_alike(spec):
    model = make_tiny_model("llama", num_layers=LAYERS)
    heads = model.config.num_key_value_heads
    press = kc.make_press({**spec, "compression_ratio": 0.75, "compile": False})
    lengths = [200, 137]
    ids, mask = left_padded(lengths)
    with press(model) as session:
        prefill(model, ids, mask)
    assert session.selections[1] is session.selections[0]
    protected = press.selector.protected_count(press.scorer.window)
    assert kept_per_row(session, heads).tolist() == [LAYERS * heads * max(press.rule.kept(n), min(protected, n))
                                                     for n in lengths]

@pytest.mark.parametrize("preset", ["pyramidkv", "adakv", "chunkkv-global"])
def test_each_row_of_a_padded_batch_is_selected_as_if_alone(preset):
    model = make_tiny_model("qwen2", num_layers=4)
    press = kc.make_press(preset, compression_ratio=0.7, compile=False)
    lengths = [180, 120]
    ids, mask = left_padded(lengths, seed=3)
    with press(model) as session:
        prefill(model, ids, mask)
    together = session.selections
    for r, n in enumerate(lengths):
        pad = max(lengths) - n
        with press(model) as alone:
            prefill(model, ids[r : r + 1, pad:])
        for layer, selection in alone.selections.items():
            for head in range(selection.indices.shape[1]):
                mine = together[layer].indices[r, head][together[layer].slot_valid[r, head]] - pad
                assert torch.equal(mine, selection.indices[0, head][selection.slot_valid[0, head]]), (layer, head)


def test_pyramid_layers_keep_less_as_depth_grows():
    model = make_tiny_model("llama", num_layers=LAYERS)
    with kc.make_press("pyramidkv", compression_ratio=0.75, window=8, compile=False)(model) as session:
        prefill(model, torch.randint(3, 120, (1, 400)))
    counts = [int(session.selections[i].slot_valid[0, 0].sum()) for i in range(LAYERS)]
    assert counts[0] > counts[-1] and counts == sorted(counts, reverse=True)


def test_the_global_allocator_gives_layers_different_budgets_after_the_prefill():
    model = make_tiny_model("llama", num_layers=LAYERS)
    press = kc.make_press("chunkkv-global", compression_ratio=0.75, compile=False)
    assert press.whole_cache
    with press(model) as session:
        context = prefill(model, torch.randint(3, 120, (1, 300), generator=torch.Generator().manual_seed(4)))
    per_layer = [int(s.slot_valid[0].sum()) for s in session.selections.values()]
    assert len(set(per_layer)) > 1  # budgets really moved between layers
    for idx, layer in enumerate(context.cache.layers):  # evicted once, after the prefill
        assert layer.keys.shape[-2] == session.selections[idx].indices.shape[-1] < 300


@pytest.mark.parametrize("preset", ["adakv", "chunkkv-adaptive", "chunkkv-global"])
def test_ragged_heads_in_evict_mode_give_the_logits_of_mask_mode_and_save_memory(preset):
    model = make_tiny_model("qwen3", num_layers=4)
    ids, mask = left_padded([220, 150], seed=6)
    question = torch.tensor([[5, 6, 7]] * 2)
    out = {}
    for mode in ("evict", "mask"):
        press = kc.make_press(preset, compression_ratio=0.75, window=16, compile=False, apply=mode)
        with press(model) as session:
            context = prefill(model, ids, mask)
            tokens = greedy_continue(model, context, question, max_new_tokens=4)
        out[mode] = (context.last_logits, tokens, context)
    torch.testing.assert_close(out["evict"][0], out["mask"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(out["evict"][1], out["mask"][1])
    assert any(not s.shared and len(set(s.slot_valid[0].sum(-1).tolist())) > 1 for s in session.selections.values())
    evicted = sum(layer.keys.nbytes for layer in out["evict"][2].cache.layers)
    whole = sum(layer.keys.nbytes for layer in out["mask"][2].cache.layers)
    assert evicted < 0.6 * whole


@dataclass(frozen=True)
class StarvedLayerScorer(Scorer):
    """Key norms, but every token of layer ``layer`` scores far below the others: a global top-k
    keeps nothing there. Passed as an instance, never registered: a registered test part would
    join the registry-wide setting checks of tests/test_part_validation.py."""

    layer: int = 0

    def prepare(self, inputs):
        return {"bias": torch.tensor(-1e6 if inputs.layer_idx == self.layer else 0.0)}

    def score(self, keys, valid, bias):
        return -keys.float().norm(dim=-1) + bias


@pytest.mark.parametrize("spec,budget", [
    ({"scorer": "knorm", "grouper": "token", "selector": "topk", "allocator": "pyramid"}, {"compression_ratio": 0.9}),
    ({"scorer": "knorm", "grouper": "token", "selector": "topk", "allocator": "pyramid"}, {"budget": 1}),
    ({"scorer": StarvedLayerScorer(layer=3), "grouper": "token", "selector": "topk(per_head=True)",
      "allocator": "global"}, {"compression_ratio": 0.9}),
    ({"scorer": StarvedLayerScorer(layer=0), "grouper": "token", "selector": "topk(per_head=True)",
      "allocator": "global"}, {"compression_ratio": 0.9}),
], ids=["pyramid-ratio", "pyramid-budget", "global-last-layer", "global-first-layer"])
def test_a_layer_that_keeps_no_token_decodes_like_mask_mode(spec, budget):
    """A layer can keep no token at all: with nothing protected, the pyramid gives the top
    layers 0 of a 1-token budget, and a global top-k may starve a layer. Before, evict mode got
    it wrong, without an error: the in-hook path (pyramid) kept one gathered slot, position 0's
    key and value (``x[-0:]`` is all of ``x``), which later tokens attended to as if appended
    (question logits 0.31 away from mask mode); the whole-cache path (global) left 0 slots, which
    read as an empty layer, so the question's forward was taken for a prefill of that layer and
    compressed (2 of its 5 tokens kept; the next logits 0.26 away), and a first layer of 0 slots
    made ``get_seq_length()`` 0 (routing off: a shape error). Now such a layer holds one hidden slot."""
    model = make_tiny_model("llama", num_layers=4)
    ids, mask = left_padded([6, 9], seed=2)
    question, more = torch.tensor([[7, 8, 9, 10, 11]] * 2), torch.tensor([[12, 13]] * 2)
    out = {}
    for mode in ("evict", "mask"):
        with kc.make_press(spec, apply=mode, compile=False, **budget)(model) as session:
            context = prefill(model, ids, mask)
            selections = dict(session.selections)
            asked = kc.generation.teacher_forced_logits(model, context, question)
            assert session.selections == selections  # the question is no prefill of any layer
            later = kc.generation.teacher_forced_logits(model, context, more)
            tokens = greedy_continue(model, context, more, max_new_tokens=4)
        out[mode] = (asked, later, tokens, selections, context)
    starved = [idx for idx, s in out["evict"][3].items() if int(s.slot_valid.sum()) == 0]
    assert starved  # the case this test is about: some layer keeps nothing
    torch.testing.assert_close(out["evict"][0], out["mask"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["evict"][1], out["mask"][1], rtol=1e-4, atol=1e-4)
    assert torch.equal(out["evict"][2], out["mask"][2])


def test_allocator_capabilities_are_checked_in_one_place():
    with pytest.raises(kc.SpecError, match="per_head=True"):
        kc.make_press({"scorer": "knorm", "selector": "topk", "allocator": "adaptive", "compression_ratio": 0.5})
    with pytest.raises(kc.SpecError, match="count='tokens'"):
        kc.make_press({"scorer": "snapkv", "grouper": "chunk", "selector": "topk(count='groups')",
                       "allocator": "pyramid", "compression_ratio": 0.5})


@settings(max_examples=40)
@given(
    preset=st.sampled_from(sorted(kc.list_presets())),
    ratio=st.sampled_from([None, 0.3, 0.75, 0.9]),
    budget=st.integers(1, 4096),
    apply=st.sampled_from(["evict", "mask"]),
    compile=st.booleans(),
)
def test_to_spec_rebuilds_an_equal_press_for_every_preset(preset, ratio, budget, apply, compile):
    base = kc.make_press(preset, compression_ratio=0.5)
    if base.selector.needs_ratio and ratio is None:
        ratio = 0.6
    settings_ = {"compression_ratio": ratio} if ratio is not None else {"budget": budget}
    press = kc.make_press(preset, apply=apply, compile=compile, **settings_)
    spec = press.to_spec()
    rebuilt = kc.make_press(spec)
    assert rebuilt == press and rebuilt.name == press.name
    import json

    assert kc.make_press(json.loads(json.dumps(spec))) == press  # plain data


def test_a_global_press_refuses_layer_by_layer_selection_instead_of_degrading():
    press = kc.make_press("chunkkv-global", compression_ratio=0.5, compile=False)
    keys = torch.randn(1, 2, 100, 16)
    inputs = kc.policies.LayerInputs(None, 0, None, keys, keys, torch.ones(1, 100, dtype=torch.bool))
    with pytest.raises(ValueError, match="selects over every layer at once"):
        press.select(inputs)


@settings(max_examples=60, deadline=None)
@given(
    pools=st.integers(1, 6), length=st.integers(4, 60), size=st.integers(1, 5), protect=st.integers(0, 6),
    share=st.floats(0.05, 1.0), floor=st.sampled_from([0.0, 0.2, 0.5, 1.0]), reduce=st.sampled_from(["sum", "mean", "max"]),
    seed=st.integers(0, 10_000),
)
def test_a_pool_floor_guarantees_each_pool_its_share_within_the_exact_budget(pools, length, size, protect, share, floor,
                                                                             reduce, seed):
    """AdaKV's safeguard: every pool (head, or layer x head) keeps first ``int(floor * free / P)``
    of its own best tokens; protected tokens stay, the total stays exact, floor 0 is the plain
    pooled ranking."""
    from kvpress_chunk.policies.selectors import protected_mask, select_pooled

    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, pools, length, generator=generator)
    valid = torch.ones(1, length, dtype=torch.bool)
    protected = protected_mask(valid, 0, min(protect, length))
    group_ids = (torch.arange(length) // size)[None]
    num_groups = -(-length // size)
    n_prot = int(protected.sum())
    per_pool = max(n_prot, min(length, n_prot + int(share * (length - n_prot))))
    total = torch.tensor([per_pool * pools])
    out = select_pooled(scores, group_ids, num_groups, valid, protected, total, reduce, floor)
    counts = out.slot_valid.sum(dim=-1)[0]
    assert int(counts.sum()) == per_pool * pools
    guaranteed = int(floor * (per_pool - n_prot))
    assert bool((counts >= n_prot + guaranteed).all())
    for pool in range(pools):  # protected tokens always stay
        kept = set(out.indices[0, pool][out.slot_valid[0, pool]].tolist())
        assert set(torch.nonzero(protected[0]).flatten().tolist()) <= kept
    if floor == 0.0:
        plain = select_pooled(scores, group_ids, num_groups, valid, protected, total, reduce)
        assert torch.equal(plain.indices, out.indices)
    if floor == 1.0:  # every pool gets its even share: uniform budgets
        assert bool((counts == per_pool).all())


@pytest.mark.parametrize("allocator", ["adaptive", "global"])
@pytest.mark.parametrize("floor", [0.5, 1.0])
def test_a_floored_allocator_keeps_the_budget_and_every_head_its_floor_in_a_real_model(allocator, floor):
    model = make_tiny_model("llama", num_layers=LAYERS)
    heads = model.config.num_key_value_heads
    preset = "chunkkv-global" if allocator == "global" else "chunkkv-adaptive"
    press = kc.make_press({"preset": preset, "allocator": {"name": allocator, "floor": floor},
                           "compression_ratio": 0.8, "compile": False})
    lengths = [200, 137]
    ids, mask = left_padded(lengths)
    with press(model) as session:
        prefill(model, ids, mask)
    protected = press.selector.protected_count(press.scorer.window)
    kept = [max(press.rule.kept(n), min(protected, n)) for n in lengths]
    assert kept_per_row(session, heads).tolist() == [LAYERS * heads * k for k in kept]
    for selection in session.selections.values():
        counts = selection.slot_valid.sum(dim=-1)  # [B, heads]
        for r, k in enumerate(kept):
            assert bool((counts[r] >= protected + int(floor * (k - protected))).all())
            if floor == 1.0:  # an even split: every head keeps the uniform share (ragged without a floor)
                assert bool((counts[r] == k).all()), counts[r]

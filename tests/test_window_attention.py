"""policies/window_attention.py: the fused SnapKV score (``SnapKVScorer.score``) equals the plain
``SnapKVScorer.score_reference``, eager and compiled, with padding, both window-score rules and GQA layouts; the
in-place CPU softmax equals torch.softmax; selections through a press are unchanged; observed
attention's fused accumulation (``window_attention_sum``) equals its plain reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpress_chunk as kc
from kvpress_chunk.policies.scorers import ObservedAttentionScorer, SnapKVScorer
from kvpress_chunk.policies.window_attention import (
    snapkv_scores,
    snapkv_scores_traced,
    snapkv_window_mass,
    window_attention_floor,
)


def inputs(batch, kv_heads, groups, window, length, pad, seed):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, kv_heads * groups, window, 16, generator=generator) * 0.5
    keys = torch.randn(batch, kv_heads, length, 16, generator=generator)
    valid = torch.ones(batch, length, dtype=torch.bool)
    for row in range(batch):
        valid[row, : pad * row] = False  # left padding, longer in later rows (may exceed the window)
    return queries, keys, valid


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.sampled_from([1, 3]), groups=st.sampled_from([1, 3]),
    window=st.sampled_from([1, 4, 16]), length=st.integers(20, 300), pad=st.integers(0, 40),
    kernel=st.sampled_from([1, 5, 7]), rule=st.sampled_from(["zero", "max+1"]), seed=st.integers(0, 1000),
)
def test_fused_scores_equal_the_reference_scorer(batch, kv_heads, groups, window, length, pad, kernel, rule, seed):
    queries, keys, valid = inputs(batch, kv_heads, groups, window, length, min(pad, length // 4), seed)
    scorer = SnapKVScorer(window=window, kernel=kernel, window_scores=rule)
    want = scorer.score_reference(keys, valid, queries)
    torch.testing.assert_close(scorer.score(keys, valid, queries), want, rtol=1e-5, atol=1e-7)
    for fn in (snapkv_scores, snapkv_scores_traced):
        got = fn(queries, keys, valid, kernel, rule)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_compiled_fused_scores_equal_eager():
    compiled = torch.compile(snapkv_scores, fullgraph=True, dynamic=True)
    for length, pad in ((100, 0), (257, 9), (64, 3)):
        queries, keys, valid = inputs(2, 3, 3, 16, length, pad, length)
        torch.testing.assert_close(compiled(queries, keys, valid, 5, "zero"), snapkv_scores(queries, keys, valid, 5, "zero"),
                                   rtol=1e-6, atol=1e-8)


def test_in_place_softmax_equals_torch_softmax():
    torch.manual_seed(0)
    for shape in ((3, 192, 8192), (1, 7, 33), (2, 5, 1)):
        logits = torch.randn(shape) * 10
        want = torch.softmax(logits, dim=-1)
        got = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        assert got.data_ptr() == logits.data_ptr()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_floor_is_the_bare_softmax():
    queries, keys, _ = inputs(1, 3, 3, 8, 50, 0, 1)
    probs = window_attention_floor(queries, keys)
    assert probs.shape == (1, 3, 24, 50)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 3, 24))


def test_custom_op_passes_torch_library_checks():
    queries, keys, valid = inputs(2, 3, 3, 8, 80, 5, 2)
    torch.library.opcheck(snapkv_window_mass, (queries, keys, valid, 5))


@dataclasses.dataclass(frozen=True)
class ReferenceSnapKV(SnapKVScorer):
    """SnapKVScorer scoring with its plain reference instead of the fused op."""

    def score(self, keys, valid, queries):
        return self.score_reference(keys, valid, queries)


@pytest.mark.parametrize("preset", ["chunkkv", "chunkkv-kvpress", "snapkv"])
def test_selections_through_a_press_are_unchanged(preset):
    from tiny_models import make_tiny_model
    from transformers import DynamicCache

    model = make_tiny_model("llama")
    ids = torch.randint(3, 120, (2, 260), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 260, dtype=torch.long)
    mask[1, :37] = 0
    press = kc.make_press(preset, compression_ratio=0.75, compile=False)
    reference = press.replace(scorer=ReferenceSnapKV(**{f.name: getattr(press.scorer, f.name) for f in dataclasses.fields(press.scorer)}))
    selections = []
    for candidate in (press, reference):
        with candidate(model) as session, torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config))
        selections.append([s.indices for s in session.selections.values()])
    for want, got in zip(*selections):
        assert torch.equal(got, want)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.sampled_from([1, 3]), groups=st.sampled_from([1, 3]),
    observers=st.sampled_from([1, 7, 40, 300, 0]), length=st.integers(20, 320), pad=st.integers(0, 40),
    seed=st.integers(0, 1000),
)
def test_fused_observed_attention_equals_its_reference(batch, kv_heads, groups, observers, length, pad, seed):
    """``observed``'s fused accumulation (``window_attention_sum`` per block of 256 observers)
    equals the plain probabilities summed, padding and several blocks included (compiled: the
    next test)."""
    count = length if observers == 0 else min(observers, length)
    queries, keys, valid = inputs(batch, kv_heads, groups, count, length, min(pad, length // 4), seed)
    scorer = ObservedAttentionScorer(queries=observers)
    want = scorer.score_reference(keys, valid, queries)
    torch.testing.assert_close(scorer.score(keys, valid, queries), want, rtol=1e-5, atol=1e-7)


def test_compiled_fused_observed_attention_equals_eager():
    scorer = ObservedAttentionScorer(queries=300)
    compiled = torch.compile(scorer.score, fullgraph=True, dynamic=True)
    for length, pad in ((320, 0), (400, 9)):
        queries, keys, valid = inputs(2, 3, 3, 300, length, pad, length)
        torch.testing.assert_close(compiled(keys, valid, queries), scorer.score_reference(keys, valid, queries),
                                   rtol=1e-5, atol=1e-7)

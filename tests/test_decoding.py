"""Decoding-time compression (issue 12): bounded cache while generating, kvpress_chunk/decoding.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpress_chunk as kc
from kvpress_chunk.decoding import Decoding
from kvpress_chunk.generation import greedy_continue, prefill
from kvpress_chunk.modes.routing import attached_views, router_of
from kvpress_chunk.registry import SpecError
from tiny_models import left_padded, make_tiny_model

_MODEL = {}


def tiny():
    if "m" not in _MODEL:
        model = make_tiny_model("llama", num_layers=3)
        model.generation_config.eos_token_id = None  # long generations: never stop early
        _MODEL["m"] = model
    return _MODEL["m"]


def row_counts(model, cache) -> list[int]:
    """Real tokens per row of every compressed layer's cache (views + tokens appended since)."""
    router = router_of(model)
    views = router.views.get(cache, {}) if router is not None else (attached_views(cache) or {})  # outside a press
    worst = None
    for idx, layer in enumerate(cache.layers):
        length = layer.keys.shape[-2]
        view = views.get(idx)
        counts = torch.full((layer.keys.shape[0],), length)
        if view is not None:
            counts = view.visible[:, 0].sum(dim=-1) + (length - view.prefix_length)
        worst = counts if worst is None else torch.maximum(worst, counts)
    return worst.tolist()


def test_spec_forms_and_round_trip(tmp_path):
    press = kc.make_press("chunkkv", compression_ratio=0.5, decoding={"every": 16, "max_cache": 128})
    assert press.decoding == Decoding(16, 128, False)
    assert kc.make_press(press.to_spec()) == press
    toml = tmp_path / "p.toml"
    toml.write_text('preset = "chunkkv"\ncompression_ratio = 0.5\n[decoding]\nevery = 16\nmax_cache = 128\n')
    assert kc.make_press(str(toml)) == press
    assert kc.make_press(press, decoding=None).decoding is None
    assert "decoding(every=16, max_cache=128)" in press.describe()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decoding": {"every": 0, "max_cache": 8}}, "every"),
        ({"decoding": {"every": 4, "max_cache": 8, "bogus": 1}}, "bogus"),
        ({"decoding": 12}, "dict"),
        ({"decoding": {"every": 4, "max_cache": 8}}, "always keeps"),
    ],
)
def test_bad_settings_raise_spec_errors(kwargs, message):
    kwargs = {"decoding": {"every": 4, "max_cache": 64}, **kwargs}
    with pytest.raises(SpecError, match=message):
        kc.make_press("chunkkv", compression_ratio=0.5, **kwargs)


def test_the_sentence_grouper_is_refused():
    with pytest.raises(SpecError, match="sentence"):
        kc.make_press("chunkkv-sentence", compression_ratio=0.5, decoding={"every": 4, "max_cache": 64})


@pytest.mark.parametrize("preset", ["chunkkv-global", "adakv", "chunkkv-adaptive"])
def test_allocators_that_pool_heads_are_refused_the_global_one_included(preset):
    """docs/decoding.md said global allocators run as uniform in decoding passes; they have been
    refused with the head-adaptive ones since decoding compression came (it pools heads)."""
    with pytest.raises(SpecError, match="equal token counts per head"):
        kc.make_press(preset, compression_ratio=0.5, decoding={"every": 4, "max_cache": 64})


def test_a_cache_bound_never_reached_decodes_exactly_like_the_prefill_only_press():
    model = tiny()
    ids, mask, _ = left_padded([70, 40])
    base = kc.make_press("chunkkv", compression_ratio=0.5, compile=False)
    outs = []
    for press in (base, base.replace(decoding={"every": 4, "max_cache": 10_000})):
        with press(model):
            context = prefill(model, ids, mask)
            outs.append(greedy_continue(model, context, ids[:, -1:], 30))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("preset, protect", [("chunkkv", False), ("chunkkv", True), ("chunkkv-expected", False)])
def test_generate_on_a_padded_batch_gives_each_row_its_answer_alone(preset, protect):
    model = tiny()
    press = kc.make_press(preset, compression_ratio=0.5, compile=False,
                          decoding={"every": 8, "max_cache": 40, "protect_prompt": protect})
    ids, mask, rows = left_padded([60, 25], seed=1)
    with press(model) as session:
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=0)
        assert session.decoder.compressions > 0
        batched = batched[:, ids.shape[1]:]
        for r, row in enumerate(rows):
            alone = model.generate(row[None], max_new_tokens=60, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[r], alone[0, row.shape[0]:]), f"row {r}"
        # our loop gives generate's tokens (same feed)
        context = prefill(model, ids, mask)
        first = context.last_logits.argmax(dim=-1, keepdim=True)
        rest = greedy_continue(model, context, first, max_new_tokens=59)
    assert torch.equal(torch.cat([first, rest], dim=-1), batched)


@settings(max_examples=10, deadline=None)
@given(
    every=st.integers(1, 12),
    extra=st.integers(0, 24),
    lengths=st.lists(st.integers(5, 70), min_size=1, max_size=3),
    protect=st.booleans(),
    preset=st.sampled_from(["chunkkv", "snapkv", "streamingllm", "pyramidkv"]),
)
def test_the_cache_never_holds_more_than_max_cache_plus_every(every, extra, lengths, protect, preset):
    model = tiny()
    base = kc.make_press(preset, compression_ratio=0.5)
    max_cache = base.selector.protected_count(base.scorer.window) + extra
    press = kc.make_press(preset, compression_ratio=0.5, compile=False,
                          decoding={"every": every, "max_cache": max_cache, "protect_prompt": protect})
    ids, mask, _ = left_padded(lengths, seed=sum(lengths))
    seen = []
    with press(model):
        context = prefill(model, ids, mask)
        prompt = row_counts(model, context.cache)
        handle = model.register_forward_hook(lambda *a: seen.append(row_counts(model, context.cache)))
        try:
            greedy_continue(model, context, ids[:, -1:], 2 * (max_cache + every) + 3)
        finally:
            handle.remove()
    for counts in seen:
        for row, count in enumerate(counts):
            bound = max_cache + every + (prompt[row] if protect else 0)
            assert count <= bound, (counts, prompt, bound)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="no torch.compile")
def test_the_compiled_op_does_not_recompile_per_step_over_400_steps():
    """Fresh process: graphs held by the compiled op after a 400-token generation (24
    compressions, positions past 450) stay few: a graph per step, per position or per cache
    length would be dozens (dynamo's default limit is 8 per code object), not <= 4."""
    code = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, "tests")
        import kvpress_chunk as kc
        from kvpress_chunk.compile import ops
        from kvpress_chunk.modes.flex import _graphs
        from kvpress_chunk.generation import greedy_continue, prefill
        from tiny_models import make_tiny_model
        model = make_tiny_model("llama", num_layers=2)
        press = kc.make_press("chunkkv", compression_ratio=0.5, compile=True,
                              decoding={"every": 16, "max_cache": 64})
        ids = torch.randint(3, 128, (2, 80)); mask = torch.ones_like(ids); mask[1, :30] = 0
        with press(model) as session:
            context = prefill(model, ids, mask)
            greedy_continue(model, context, ids[:, -1:], 400)
        graphs = sum(_graphs(fn) for fn in ops._COMPILED.values())
        print("GRAPHS", graphs, "COMPRESSIONS", session.decoder.compressions)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("GRAPHS")][0]
    graphs, compressions = int(line.split()[1]), int(line.split()[3])
    assert compressions >= 20
    assert graphs <= 4, line


def test_decoding_refuses_a_scorer_with_a_context_pass():
    with pytest.raises(SpecError, match="extra pass"):
        kc.make_press("chunkkv-kvzip", compression_ratio=0.5, decoding={"every": 8, "max_cache": 64})


@pytest.mark.parametrize("preset", ["observed", "observed(queries=0)", "observed(queries=8)"])
def test_observed_beyond_one_query_is_refused(preset):
    """Decode steps kept the hidden states of the scorer's window only (one token for observed),
    so observed scored as TOVA, silently (hunt round 12); its observers are the keys' last
    positions, which a decoding compression moves, so it is refused."""
    with pytest.raises(SpecError, match="last positions of the keys"):
        kc.make_press(preset, compression_ratio=0.5, decoding={"every": 8, "max_cache": 64})


def test_expected_attention_statistics_come_from_the_last_every_generated_tokens(monkeypatch):
    """Decode steps kept one hidden state for expected attention: its statistics were one query's
    (covariance 0, no averaged rotation), silently (hunt round 12). They are now over the last
    ``every`` tokens, the same hidden states the attention layer read."""
    from kvpress_chunk.policies.expected_attention import ExpectedAttentionScorer, query_statistics

    model = tiny()
    every = 4
    ids, mask, _ = left_padded([70, 40], seed=3)
    read: dict[int, list] = {}
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, idx=idx: read.setdefault(idx, []).append(kwargs["hidden_states"].clone()),
            with_kwargs=True,
        )
        for idx, layer in enumerate(model.model.layers)
    ]
    checked = []
    original = ExpectedAttentionScorer.prepare

    def spy(self, inputs):
        if inputs.query_valid is not None:  # a decoding pass
            expected = torch.cat(read[inputs.layer_idx], dim=1)[:, -every:]
            assert torch.equal(inputs.hidden_states, expected)
            assert bool(inputs.query_valid.all()) and inputs.query_valid.shape == expected.shape[:2]
            prepared = original(self, inputs)
            _, covariance = query_statistics(prepared["queries"], prepared["weights"], prepared["rotation"])
            checked.append(float(covariance.abs().max()))  # several queries: not 0
            return prepared
        return original(self, inputs)

    monkeypatch.setattr(ExpectedAttentionScorer, "prepare", spy)
    press = kc.make_press("chunkkv-expected", compression_ratio=0.5, compile=False,
                          decoding={"every": every, "max_cache": 24})
    try:
        with press(model):
            context = prefill(model, ids, mask)
            greedy_continue(model, context, ids[:, -1:], 16)
    finally:
        for handle in handles:
            handle.remove()
    assert checked and min(checked) > 0


def test_a_scorer_that_reads_only_its_window_runs_with_decoding():
    model = tiny()
    ids, mask, _ = left_padded([70, 40])
    for preset in ("observed(queries=1)", "tova", "snapkv(window=8)", "chunkkv-expected"):
        press = kc.make_press(preset, compression_ratio=0.5, compile=False, decoding={"every": 4, "max_cache": 24})
        with press(model):
            context = prefill(model, ids, mask)
            greedy_continue(model, context, ids[:, -1:], 12)
            assert max(row_counts(model, context.cache)) <= 24 + 4, preset  # the bound held: it compressed


@pytest.mark.parametrize("apply", ["evict", "mask"])
def test_beam_search_is_refused_with_a_clear_error(apply):
    from kvpress_chunk.decoding import BeamSearchNotSupportedError

    model = tiny()
    ids, mask, _ = left_padded([40, 30], seed=2)
    press = kc.make_press("chunkkv", compression_ratio=0.5, compile=False, apply=apply,
                          decoding={"every": 4, "max_cache": 40})
    with press(model):
        with pytest.raises(BeamSearchNotSupportedError, match=r"beam search \(num_beams > 1\).*num_beams=1"):
            model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0)
        # greedy decoding with the same press still works afterwards
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 8)
    # prefill-only compression keeps working with beams (each prompt's beams share its selection)
    with press.replace(decoding=None)(model):
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, ids.shape[1] + 8)


@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("protect_prompt", [False, True])
def test_a_padded_batch_of_questions_compresses_while_decoding_as_each_row_alone(mode, protect_prompt):
    # greedy_continue feeds questions of different lengths one token per row per forward; the
    # decoding press compressed a row in the middle of its question (max_cache 34: a 12-token
    # question answered other tokens than the row alone, which takes its question in one forward).
    model = tiny()
    ids, mask, rows = left_padded([60, 45, 52])
    questions = [torch.arange(5, 17), torch.tensor([11, 12]), torch.tensor([20, 21, 22, 23, 24])]
    q_ids, q_mask = torch.zeros(3, 12, dtype=torch.long), torch.zeros(3, 12, dtype=torch.long)
    for r, q in enumerate(questions):
        q_ids[r, 12 - len(q):], q_mask[r, 12 - len(q):] = q, 1
    press = kc.make_press("chunkkv", compression_ratio=0.5, apply=mode,
                          decoding={"every": 4, "max_cache": 34, "protect_prompt": protect_prompt})
    with press(model):
        batched = greedy_continue(model, prefill(model, ids, mask), q_ids, 12, attention_mask=q_mask)
        for r, (row, question) in enumerate(zip(rows, questions)):
            alone = greedy_continue(model, prefill(model, row[None]), question[None], 12)
            assert batched[r].tolist() == alone[0].tolist(), r


@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_a_context_continued_outside_its_decoding_press_warns_once(mode):
    """Decoding-time compression runs in the press's hooks: a context prefilled under such a press
    and continued after the block grew past max_cache (answers of the press without `decoding`),
    no word said. Now a warning, once per cache; inside the block (or under another decoding
    press) none, and a copy made inside is warned for on its own."""
    from kvpress_chunk.decoding import DecodingOutsideThePressWarning

    model = tiny()
    ids, mask, _ = left_padded([60, 45])
    press = kc.make_press("chunkkv", compression_ratio=0.5, apply=mode, compile=False,
                          decoding={"every": 4, "max_cache": 34})
    with press(model):
        context = prefill(model, ids, mask)
        spare = context.copy()
        greedy_continue(model, context, ids[:, -1:], 3)  # inside: no warning (pytest turns it into an error)
    with pytest.warns(DecodingOutsideThePressWarning, match="decodes without compressing"):
        greedy_continue(model, context, ids[:, -1:], 40)
    assert max(row_counts(model, context.cache)) > 34 + 4  # what the warning says: the bound did not hold
    greedy_continue(model, context, ids[:, -1:], 2)  # once per cache (an error if it warned again)
    with pytest.warns(DecodingOutsideThePressWarning):
        greedy_continue(model, spare, ids[:, -1:], 2)
    plain = kc.make_press("chunkkv", compression_ratio=0.5, apply=mode, compile=False)
    with plain(model):
        fresh = prefill(model, ids, mask)
    greedy_continue(model, fresh, ids[:, -1:], 2)  # no decoding press at prefill: nothing to warn about

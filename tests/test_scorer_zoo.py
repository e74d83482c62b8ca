"""The query-agnostic scorers of the zoo (expected attention, KeyDiff, TOVA, observed attention)
against independent oracles: the model's own rotary embedding and eager attention weights, plain
float64 reference code, a padded batch against its rows alone, compiled against eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import kvpress_chunk as kc
from kvpress_chunk.generation import prefill
from kvpress_chunk.policies.expected_attention import averaged_future_rope, expected_attention_scores, rope_matrix
from kvpress_chunk.policies import Scorer
from kvpress_chunk.policies.layer_inputs import LayerInputs
from tiny_models import make_tiny_model

ZOO = ["expected-attention", "chunkkv-expected", "keydiff", "keydiff(chunk_size=8)", "tova", "observed", "observed(queries=0)"]
# random: one draw over the whole batch scored a padded row otherwise than alone (logits 0.4 apart)
ALONE = ZOO + ["random", "random(seed=7)"]


def prompt(length, seed=0, batch=1):
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def captured_layer(model, ids, mask=None, layer_idx=1):
    """The LayerInputs a press hook sees at ``layer_idx`` (what the scorers are given)."""
    seen = {}

    class Capture(Scorer):
        def prepare(self, inputs):
            if inputs.layer_idx == layer_idx:
                seen["inputs"] = inputs
            return {}

        def score(self, keys, valid):
            return torch.zeros(keys.shape[:-1])

    press = kc.make_press({"scorer": Capture(), "grouper": "token", "selector": "topk", "compression_ratio": 0.5})
    with press(model):
        prefill(model, ids, mask)
    return seen["inputs"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_future_rope_extrapolation_equals_the_models_rotary_embedding(family):
    scaling = {"rope_scaling": {"rope_type": "linear", "factor": 2.0}} if family == "llama" else {}
    model = make_tiny_model(family, num_layers=2, **scaling)
    length, future = 37, 64
    inputs = captured_layer(model, prompt(length), layer_idx=0)
    cos, sin = inputs.position_embeddings
    got_cos, got_sin = averaged_future_rope(cos, sin, future)
    positions = torch.arange(length, length + future)[None]
    want_cos, want_sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(got_cos, want_cos.mean(dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_sin, want_sin.mean(dim=1), atol=1e-5, rtol=1e-4)
    # The matrix form applies RoPE as the model does: x * cos + rotate_half(x) * sin.
    x = torch.randn(1, cos.shape[-1])
    half = x.shape[-1] // 2
    rotated = x * got_cos + torch.cat([-x[:, half:], x[:, :half]], dim=-1) * got_sin
    torch.testing.assert_close((rope_matrix(got_cos, got_sin) @ x[..., None])[..., 0], rotated)


def test_expected_attention_scores_match_a_float64_reference():
    gen = torch.Generator().manual_seed(3)
    batch, kv_heads, groups, length, dim = 2, 2, 2, 9, 4
    keys = torch.randn(batch, kv_heads, length, dim, generator=gen)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :3] = False
    mean = torch.randn(batch, kv_heads * groups, dim, generator=gen) * 0.5
    a = torch.randn(batch, kv_heads * groups, dim, dim, generator=gen) * 0.3
    cov = a @ a.transpose(-1, -2)
    vnorm = torch.rand(batch, kv_heads, length, generator=gen) + 0.5
    got = expected_attention_scores(keys, valid, mean, cov, vnorm)
    want = torch.zeros(batch, kv_heads, length, dtype=torch.float64)
    for b in range(batch):
        real = [j for j in range(length) if valid[b, j]]
        for h in range(kv_heads * groups):
            kv = h // groups
            logits = torch.tensor([
                float(keys[b, kv, j].double() @ mean[b, h].double()
                      + 0.5 * keys[b, kv, j].double() @ cov[b, h].double() @ keys[b, kv, j].double())
                for j in real
            ])
            probs = torch.softmax(logits, dim=0)
            for p, j in zip(probs, real):
                want[b, kv, j] += p / groups * vnorm[b, kv, j]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


@torch.inference_mode()
def test_expected_attention_statistics_leave_out_sinks_and_padding():
    model = make_tiny_model("llama", num_layers=2)
    ids = prompt(30)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=-1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], dim=-1)
    scorer = kc.make_press("expected-attention", compression_ratio=0.5).scorer
    alone = scorer.statistics(captured_layer(model, ids))
    with_pad = scorer.statistics(captured_layer(model, padded, mask))
    for got, want in zip(with_pad, alone):  # mean, covariance
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # The statistics are those of the queries after the first 4 (plain mean / covariance).
    inputs = captured_layer(model, ids)
    module = inputs.module
    q = module.q_proj(inputs.hidden_states).view(1, 30, -1, module.head_dim).transpose(1, 2)[:, :, 4:].double()
    mu = q.mean(dim=2)
    centered = q - mu[:, :, None]
    cov = centered.transpose(-1, -2) @ centered / q.shape[2]
    unrotated_mean, unrotated_cov = kc.make_press("expected-attention", compression_ratio=0.5).scorer.statistics(
        LayerInputs(**{**inputs.__dict__, "position_embeddings": None})
    )
    scale = module.scaling
    torch.testing.assert_close(unrotated_mean.double(), mu * scale, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unrotated_cov.double(), cov * scale**2, atol=1e-5, rtol=1e-4)


def test_keydiff_is_minus_the_cosine_with_the_mean_real_unit_key():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 2, 12, 8, generator=gen)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False
    got = kc.make_press("keydiff", compression_ratio=0.5).scorer.score(keys, valid)
    for b in range(2):
        real = keys[b][:, valid[b]]
        anchor = F.normalize(real, dim=-1).mean(dim=1, keepdim=True)
        want = -F.cosine_similarity(real, anchor, dim=-1)
        torch.testing.assert_close(got[b][:, valid[b]], want)


def eager_attention_probs(model, ids, layer_idx):
    """The model's own attention probabilities ``[B, Hq, T, T]`` (eager implementation)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions[layer_idx]


@torch.inference_mode()
def test_tova_and_observed_attention_equal_the_models_own_attention_weights():
    model = make_tiny_model("llama", num_layers=2)
    ids = prompt(40)
    probs = eager_attention_probs(model, ids, 1).double()  # [1, Hq, T, T]
    inputs = captured_layer(model, ids, layer_idx=1)
    kv_heads = inputs.keys.shape[1]
    groups = probs.shape[1] // kv_heads

    tova = kc.make_press("tova", compression_ratio=0.5).scorer
    got = tova.score(inputs.keys, inputs.valid, **tova.prepare(inputs))
    torch.testing.assert_close(got[0, 0].double(), probs[0, :, -1].mean(dim=0), atol=1e-5, rtol=1e-4)

    observed = kc.make_press("observed(queries=0)", compression_ratio=0.5).scorer
    got = observed.score(inputs.keys, inputs.valid, **observed.prepare(inputs))
    seen_by = torch.arange(40, 0, -1, dtype=torch.float64)
    want = (probs.sum(dim=2) / seen_by).view(1, kv_heads, groups, 40).mean(dim=2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)

    last = kc.make_press("observed(queries=10)", compression_ratio=0.5).scorer
    got = last.score(inputs.keys, inputs.valid, **last.prepare(inputs))
    seen_by = torch.clamp(torch.arange(40, 0, -1, dtype=torch.float64), max=10)
    want = (probs[:, :, -10:].sum(dim=2) / seen_by).view(1, kv_heads, groups, 40).mean(dim=2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def assert_padded_rows_select_as_alone(model, press, lengths, label):
    """Rows of ``lengths`` tokens (``prompt(n, seed=n)``), left-padded into one batch: every
    layer and head keeps, in each row, the tokens that row keeps when prefilled alone."""
    width = max(lengths)
    rows = [prompt(n, seed=n)[0] for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    with press(model) as session:
        prefill(model, ids, mask)
    together = dict(session.selections)
    for r, row in enumerate(rows):
        with press(model) as alone:
            prefill(model, row[None])
        for idx, sel in alone.selections.items():
            for head in range(sel.indices.shape[1]):
                mine = together[idx].indices[r, head][together[idx].slot_valid[r, head]] - (width - len(row))
                assert torch.equal(mine, sel.indices[0, head][sel.slot_valid[0, head]]), f"{label} row {r} layer {idx}"


@pytest.mark.parametrize("preset", ALONE)
def test_padded_batch_rows_are_selected_as_alone(preset):
    model = make_tiny_model("qwen3", num_layers=3)
    assert_padded_rows_select_as_alone(model, kc.make_press(preset, compression_ratio=0.7), (90, 61), preset)


@pytest.mark.parametrize("selector", ["topk(keep_window=False)", "entropy-gated(keep_window=False)"])
@pytest.mark.parametrize("budget", [{"budget": 20}, {"budget": 24}])
def test_recency_scores_of_a_padded_row_are_its_own_positions(selector, budget):
    """The streamingllm scorer scored positions in the padded batch: a row's scores shifted by
    its padding. Token-level top-k does not care, but chunk sums do (the short last chunk gains
    less than the full ones) and so does the entropy gate: with chunks of 16 and budget=20 a
    60-token row beside a 73-token one kept other tokens than alone, logits 0.21 away."""
    model = make_tiny_model("llama", num_layers=2)
    press = kc.make_press({"scorer": "streamingllm", "grouper": "chunk(size=16)", "selector": selector},
                          compile=False, **budget)
    assert_padded_rows_select_as_alone(model, press, (60, 73), selector)


@pytest.mark.parametrize("preset", ["expected-attention", "keydiff", "tova", "observed"])
def test_compiled_equals_eager_on_a_model(preset):
    model = make_tiny_model("llama", num_layers=2)
    ids = prompt(150, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    caches = []
    for compile in (False, True):
        with kc.make_press(preset, compression_ratio=0.75, compile=compile)(model):
            caches.append(prefill(model, ids, mask).cache)
    for a, b in zip(*(c.layers for c in caches)):
        torch.testing.assert_close(a.keys, b.keys)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_expected_attention_reuses_the_forwards_own_query_projection(family):
    """The session hands expected attention the query projection its prefill computed (no second
    projection of the whole prompt): it must equal the re-projection, padded batch included, and
    the kept tokens must be those of the re-projected queries."""
    model = make_tiny_model(family, num_layers=3)
    ids = prompt(70, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :25] = 0
    inputs = captured_layer(model, ids, mask)
    assert inputs.projected_queries is None  # a scorer that does not read queries gets none
    press = kc.make_press("expected-attention", compression_ratio=0.6, compile=False)
    seen = []
    original = type(press.scorer).prepare

    class Spy(type(press.scorer)):
        def prepare(self, inputs):
            seen.append(inputs)
            return original(self, inputs)

    spy = press.replace(scorer=Spy())
    with spy(model) as session:
        prefill(model, ids, mask)
    assert len(seen) == len(session.selections) and all(i.projected_queries is not None for i in seen)
    with torch.inference_mode():  # the prefill's tensors are inference tensors
        for inputs in list(seen):  # select() below calls prepare again
            reprojected = dataclasses.replace(inputs, projected_queries=None)
            torch.testing.assert_close(
                Spy().statistics(inputs)[0], Spy().statistics(reprojected)[0], rtol=1e-6, atol=1e-6
            )
            kept = spy.select(inputs)[2].indices
            assert torch.equal(kept, spy.select(reprojected)[2].indices), f"{family} layer {inputs.layer_idx}"

"""KVzip (context reconstruction): the scoring op against a plain reference, the reconstruction
inputs, the session's extra pass (cache restored, padded batches row-exact) and the presets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_chunk import make_press
from kvpress_chunk.generation import generate_answers, greedy_continue, new_cache, prefill, teacher_forced_logits
from kvpress_chunk.policies import kvzip as kvzip_module
from kvpress_chunk.policies.kvzip import (
    FIRST_PROMPT,
    NEXT_PROMPT,
    OVERLAP_TOKENS,
    KVzipScorer,
    PassChunk,
    attention_logsumexp,
    attention_logsumexp_reference,
    fused_pass_attention,
    local_pass_attention,
    max_pool_scores,
    reconstruction_attention_max,
)
from kvpress_chunk.registry import SpecError
from tiny_models import left_padded, make_tiny_model


class ByteTokenizer:
    """A real (if trivial) tokenizer for the tiny models: one id per byte, modulo their vocab."""

    chat_template = None

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [b % self.vocab for b in text.encode()]

        class Encoded:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids

        return Encoded()


def reference_scores(queries, keys, context_valid, query_valid, start, end, sinks, hidden_norm=None, out_norm=None):
    """Row by row, query by query: softmax over the allowed keys, max per (kv head, key)."""
    batch, kv_heads, total, _ = keys.shape
    q_heads, n = queries.shape[1], queries.shape[2]
    groups, length = q_heads // kv_heads, context_valid.shape[-1]
    scores = torch.zeros(batch, kv_heads, length, dtype=torch.float64)
    for b in range(batch):
        real = [j for j in range(length) if context_valid[b, j]]
        sink_set = [j for j in real[:sinks] if j < int(start[b])]
        span = list(range(int(start[b]), int(end[b])))
        for i in range(n):
            if not query_valid[b, i]:
                continue
            allowed = sink_set + span + [length + k for k in range(i + 1) if query_valid[b, k]]
            for h in range(q_heads):
                kv = h // groups
                logits = torch.stack([queries[b, h, i].double() @ keys[b, kv, j].double() for j in allowed])
                probs = torch.softmax(logits, dim=0)
                if hidden_norm is not None:
                    probs = probs / hidden_norm[b, i].double()
                for p, j in zip(probs, allowed):
                    if j < length:
                        weight = 1.0 if out_norm is None else float(out_norm[b, kv, h % groups, j])
                        scores[b, kv, j] = max(float(scores[b, kv, j]), float(p) * weight)
    return scores


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 2), groups=st.integers(1, 2), length=st.integers(4, 24),
    n=st.integers(1, 12), sinks=st.integers(0, 4), plus=st.booleans(), seed=st.integers(0, 10_000),
)
def test_scoring_op_matches_the_plain_reference(batch, kv_heads, groups, length, n, sinks, plus, seed):
    gen = torch.Generator().manual_seed(seed)
    head_dim = 4
    queries = torch.randn(batch, kv_heads * groups, n, head_dim, generator=gen)
    keys = torch.randn(batch, kv_heads, length + n, head_dim, generator=gen)
    pads = torch.randint(0, length // 2 + 1, (batch,), generator=gen)
    context_valid = torch.arange(length)[None, :] >= pads[:, None]
    query_lengths = torch.randint(0, n + 1, (batch,), generator=gen)
    query_valid = torch.arange(n)[None, :] < query_lengths[:, None]
    start = pads + torch.randint(0, 3, (batch,), generator=gen)
    end = torch.minimum(start + torch.randint(0, length, (batch,), generator=gen), torch.tensor(length))
    start = torch.minimum(start, end)
    hidden_norm = torch.rand(batch, n, generator=gen) + 0.5 if plus else None
    out_norm = torch.rand(batch, kv_heads, groups, length, generator=gen) + 0.5 if plus else None
    got = reconstruction_attention_max(queries, keys, context_valid, query_valid, start, end, sinks, hidden_norm, out_norm)
    want = reference_scores(queries, keys, context_valid, query_valid, start, end, sinks, hidden_norm, out_norm)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    heads=st.integers(1, 3), n=st.integers(1, 300), width=st.integers(1, 40), causal=st.booleans(),
    masked=st.integers(0, 40), seed=st.integers(0, 10_000),
)
def test_logsumexp_kernel_matches_its_reference(heads, n, width, causal, masked, seed):
    """The CPU flash-attention normaliser equals the blockwise logsumexp (padding bias, causal,
    rows with every key masked, more queries than one block)."""
    gen = torch.Generator().manual_seed(seed)
    width = n if causal else width
    queries = torch.randn(2, heads, n, 8, generator=gen)
    keys = torch.randn(2, heads, width, 8, generator=gen)
    bias = None
    if not causal:
        bias = torch.zeros(2, 1, 1, width)
        bias[0, ..., : min(masked, width)] = -1e30
    with torch.inference_mode():
        got = attention_logsumexp(queries, keys, bias, causal)
    want = attention_logsumexp_reference(queries, keys, bias, causal)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_scoring_op_on_the_reference_kernel(monkeypatch):
    """Off CPU the op reduces the logits itself: the same scores as the plain loop."""
    import kvpress_chunk.policies.kvzip as kvzip

    monkeypatch.setattr(kvzip, "attention_logsumexp", kvzip.attention_logsumexp_reference)
    gen = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(2, 4, 7, 4, generator=gen), torch.randn(2, 2, 17, 4, generator=gen)
    context_valid = torch.arange(10)[None, :] >= torch.tensor([[0], [3]])
    query_valid = torch.arange(7)[None, :] < torch.tensor([[7], [5]])
    start, end = torch.tensor([2, 4]), torch.tensor([9, 10])
    got = kvzip.reconstruction_attention_max(queries, keys, context_valid, query_valid, start, end, 2)
    want = reference_scores(queries, keys, context_valid, query_valid, start, end, 2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 2), groups=st.integers(1, 3), length=st.integers(4, 40),
    n=st.integers(1, 20), sinks=st.integers(0, 4), seed=st.integers(0, 10_000),
)
def test_fused_pass_attention_is_the_models_attention_and_the_scoring_op(batch, kv_heads, groups, length, n, sinks, seed):
    """The pass's fused layer (three flash calls) against both things it replaces: dense SDPA with
    the pass's explicit mask (every real context token + causal reconstruction tokens) for the
    output, :func:`reconstruction_attention_max` (itself tested on a plain loop) for the scores.
    Spans that skip part of the context (later chunks, a chat prefix) and left padding included."""
    gen = torch.Generator().manual_seed(seed)
    head_dim, q_heads, scale = 8, kv_heads * groups, 0.3
    query = torch.randn(batch, q_heads, n, head_dim, generator=gen)
    key = torch.randn(batch, kv_heads, length + n, head_dim, generator=gen)
    value = torch.randn(batch, kv_heads, length + n, head_dim, generator=gen)
    pads = torch.randint(0, length // 2 + 1, (batch,), generator=gen)
    context_valid = torch.arange(length)[None, :] >= pads[:, None]
    query_lengths = torch.randint(1, n + 1, (batch,), generator=gen)
    query_valid = torch.arange(n)[None, :] < query_lengths[:, None]
    start = pads + torch.randint(0, length // 2 + 1, (batch,), generator=gen)
    end = torch.minimum(start + 1 + torch.randint(0, length, (batch,), generator=gen), torch.tensor(length))
    start = torch.minimum(start, end - 1)
    chunk = PassChunk(torch.zeros(batch, n, dtype=torch.long), query_valid, torch.zeros(batch, n), start, end)
    with torch.inference_mode():
        output, scores = fused_pass_attention(query, key, value, scale, context_valid, chunk, sinks)
    allowed = torch.cat([context_valid[:, None, :].expand(batch, n, length),
                         torch.ones(n, n, dtype=torch.bool).tril()[None].expand(batch, n, n)], dim=-1)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=allowed[:, None], scale=scale
    )
    real = query_valid[:, :, None, None]  # padding queries' outputs are never read
    torch.testing.assert_close(output * real, want.transpose(1, 2) * real, atol=1e-5, rtol=1e-5)
    want_scores = reconstruction_attention_max(query * scale, key, context_valid, query_valid, start, end, sinks)
    torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=1e-5)


def random_pass_layer(batch, kv_heads, groups, length, n, seed):
    """Random ``(query, key, value, context_valid, chunk)`` of one pass layer: left padding,
    right-padded reconstruction queries, spans that skip part of the context."""
    gen = torch.Generator().manual_seed(seed)
    head_dim, q_heads = 8, kv_heads * groups
    query = torch.randn(batch, q_heads, n, head_dim, generator=gen)
    key = torch.randn(batch, kv_heads, length + n, head_dim, generator=gen)
    value = torch.randn(batch, kv_heads, length + n, head_dim, generator=gen)
    pads = torch.randint(0, length // 2 + 1, (batch,), generator=gen)
    context_valid = torch.arange(length)[None, :] >= pads[:, None]
    query_valid = torch.arange(n)[None, :] < torch.randint(1, n + 1, (batch,), generator=gen)[:, None]
    start = pads + torch.randint(0, length // 2 + 1, (batch,), generator=gen)
    end = torch.minimum(start + 1 + torch.randint(0, length, (batch,), generator=gen), torch.tensor(length))
    start = torch.minimum(start, end - 1)
    chunk = PassChunk(torch.zeros(batch, n, dtype=torch.long), query_valid, torch.zeros(batch, n), start, end)
    return query, key, value, context_valid, chunk


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 2), groups=st.integers(1, 3), length=st.integers(4, 40),
    n=st.integers(1, 20), sinks=st.integers(0, 4), softcap=st.sampled_from([None, 2.0]), seed=st.integers(0, 10_000),
)
def test_local_pass_attention_is_dense_attention_over_the_scored_keys(batch, kv_heads, groups, length, n, sinks, softcap, seed):
    """kvzip(local=True): the plain op against dense attention with an explicit mask built from
    the definition (the row's sinks before its span, the span, causal reconstruction tokens), and
    the fused CPU op (two flash calls, no rest) against it for the output and against
    :func:`reconstruction_attention_max` for the scores (whose softmax is over those same keys)."""
    query, key, value, context_valid, chunk = random_pass_layer(batch, kv_heads, groups, length, n, seed)
    scale = 0.3
    allowed = torch.zeros(batch, n, length + n, dtype=torch.bool)
    for b in range(batch):
        real = [j for j in range(length) if context_valid[b, j]]
        for j in [j for j in real[:sinks] if j < int(chunk.start[b])] + list(range(int(chunk.start[b]), int(chunk.end[b]))):
            allowed[b, :, j] = True
        allowed[b, :, length:] = torch.ones(n, n, dtype=torch.bool).tril()
    logits = torch.matmul(query * scale, key.repeat_interleave(groups, 1).transpose(-1, -2))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    want = torch.matmul(logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1), value.repeat_interleave(groups, 1))
    real = chunk.valid[:, :, None, None]  # padding queries' outputs are never read
    with torch.inference_mode():
        got = local_pass_attention(query, key, value, scale, context_valid, chunk, sinks, softcap)
        torch.testing.assert_close(got * real, want.transpose(1, 2) * real, atol=1e-5, rtol=1e-5)
        if softcap is None:
            output, scores = fused_pass_attention(query, key, value, scale, context_valid, chunk, sinks, whole_context=False)
            torch.testing.assert_close(output * real, got * real, atol=1e-5, rtol=1e-5)
            want_scores = reconstruction_attention_max(query * scale, key, context_valid, chunk.valid, chunk.start, chunk.end, sinks)
            torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=1e-5)


def test_local_kvzip_equals_kvzip_on_one_chunk_and_differs_on_several():
    """One chunk without a chat prefix: the span is the whole context, so the local pass is the
    paper's pass (same selection). Several chunks: each one no longer reads the others."""
    model = make_tiny_model("llama", num_layers=3)
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(4))
    kept = {}
    for spec, chunk_size in (("kvzip", 64), ("kvzip(local=True)", 64), ("kvzip", 20), ("kvzip(local=True)", 20)):
        with make_press(spec, compression_ratio=0.5, chunk_size=chunk_size)(model, tokenizer=ByteTokenizer()) as session:
            prefill(model, ids)
        kept[spec, chunk_size] = {layer: sel.indices.tolist() for layer, sel in session.selections.items()}
    assert kept["kvzip", 64] == kept["kvzip(local=True)", 64]
    assert kept["kvzip", 20] != kept["kvzip(local=True)", 20]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_local_pass_on_the_fused_op_equals_the_plain_op(family, monkeypatch):
    """kvzip(local=True) end to end on a padded batch in several chunks: the fused CPU op and the
    plain op (what other devices, dtypes and soft-capped models run; Gemma 2 caps its logits, so
    it always runs the plain op) keep the same tokens."""
    model = make_tiny_model(family, num_layers=3)
    ids, mask, _ = left_padded([70, 45])
    press = make_press("kvzip(local=True)", compression_ratio=0.6, chunk_size=24)
    results = {}
    for name in ("fused", "plain"):
        if name == "plain":
            monkeypatch.setattr(kvzip_module, "fused_pass_attention", lambda *args, **kwargs: None)
        with press(model, tokenizer=ByteTokenizer()) as session:
            results[name] = prefill(model, ids, mask)
        results[name + " kept"] = {layer: sel.indices.tolist() for layer, sel in session.selections.items()}
    assert results["fused kept"] == results["plain kept"]
    torch.testing.assert_close(results["fused"].last_logits, results["plain"].last_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_fused_pass_scores_like_the_models_attention_then_the_scoring_op(family, monkeypatch):
    """End to end on a padded batch in several reconstruction chunks: with the fused layer the
    pass gives the model's logits and the same kept tokens as with the model's own attention."""
    model = make_tiny_model(family, num_layers=3)
    ids, mask, _ = left_padded([70, 45])
    press = make_press("kvzip", compression_ratio=0.6, chunk_size=24)
    calls = []
    original = KVzipScorer.pass_attention

    def counted(self, *args):
        result = original(self, *args)
        calls.append(result is not None)
        return result

    results = {}
    for name, method in (("fused", counted), ("model's", lambda self, *args: None)):
        monkeypatch.setattr(KVzipScorer, "pass_attention", method)
        with press(model, tokenizer=ByteTokenizer()):
            results[name] = prefill(model, ids, mask)
    assert calls and all(calls), "the fused layer ran for every scored layer and chunk"
    fused, plain = results["fused"], results["model's"]
    torch.testing.assert_close(fused.last_logits, plain.last_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused.cache.layers, plain.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_reconstruction_inputs_of_a_padded_row_equal_the_row_alone():
    tokenizer = ByteTokenizer()
    scorer = KVzipScorer(chunk_size=16)
    long_row, short_row = list(range(1, 41)), list(range(50, 70))
    ids = torch.tensor([long_row, [0] * 20 + short_row])
    valid = ids != 0
    batch_chunks = scorer.pass_chunks(tokenizer, ids, valid)
    assert len(batch_chunks) == 3  # ceil(40 / 16)
    for row, tokens in enumerate((long_row, short_row)):
        alone = scorer.pass_chunks(tokenizer, torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.bool))
        pad = 40 - len(tokens)
        for c, chunk in enumerate(batch_chunks):
            real = chunk.valid[row]
            if c >= len(alone):
                assert not real.any() and chunk.start[row] == chunk.end[row]
                continue
            assert chunk.input_ids[row][real].tolist() == alone[c].input_ids[0].tolist()
            assert chunk.positions[row][real].tolist() == alone[c].positions[0].tolist()
            assert (int(chunk.start[row]) - pad, int(chunk.end[row]) - pad) == (int(alone[c].start[0]), int(alone[c].end[0]))
    first, second = batch_chunks[0], batch_chunks[1]
    prompt = [b % 128 for b in (FIRST_PROMPT + "\n").encode()]
    assert first.input_ids[0, : len(prompt)].tolist() == prompt
    assert first.input_ids[0, len(prompt) :].tolist() == long_row[:16]
    follow = [b % 128 for b in NEXT_PROMPT.encode()] + long_row[16 - OVERLAP_TOKENS : 16] + [10]
    assert second.input_ids[0, : len(follow)].tolist() == follow
    assert first.positions[0, 0] == 40  # continues after the prefill


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_context_pass_restores_the_cache_and_keeps_original_tokens(family):
    model = make_tiny_model(family, num_layers=4)
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    plain = prefill(model, ids)
    press = make_press("kvzip", compression_ratio=0.5, chunk_size=24)
    with press(model, tokenizer=ByteTokenizer()) as session:
        compressed = prefill(model, ids)
    assert session.selections, "nothing was compressed"
    for idx, layer in enumerate(compressed.cache.layers):
        full = plain.cache.layers[idx]
        if idx in session.skipped_layers:  # sliding layers: exactly as without a press
            torch.testing.assert_close(layer.keys, full.keys)
            continue
        selection = session.selections[idx]
        kept, _ = selection.apply(full.keys, full.values)
        torch.testing.assert_close(layer.keys, kept)
    kept_total = sum(int(s.slot_valid.sum()) for i, s in session.selections.items())
    heads = model.config.num_key_value_heads
    assert kept_total == len(session.selections) * heads * 30  # global allocator: exact total budget


def _non_attention_state(layer) -> dict:
    return {name: value for name, value in vars(layer).items() if name not in ("keys", "values")}


@pytest.mark.parametrize("model_type,config", [
    ("lfm2", {"layer_types": ["conv", "full_attention"] * 2}),
    ("jamba", {"attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 2, "expert_layer_period": 2,
               "use_mamba_kernels": False, "mamba_d_state": 4, "mamba_expand": 2}),
])
def test_context_pass_restores_the_recurrent_states_of_hybrid_models(model_type, config):
    """The convolution / Mamba layers of hybrid models (transformers >= 5.2x caches) write their
    states in place: restoring the layers' attribute references after the reconstruction pass
    gave back the *reconstruction prompt's* states, so every token decoded after a kvzip prefill
    read the wrong recurrent state (no error). Their state must equal a plain prefill's."""
    import transformers.cache_utils
    from tiny_models import make_auto_tiny_model

    if not hasattr(transformers.cache_utils, "LinearAttentionLayer"):
        pytest.skip("this transformers release keeps hybrid states in a model-specific cache, which a press refuses")
    model = make_auto_tiny_model(model_type, num_hidden_layers=4, **config)
    ids = torch.randint(3, 120, (1, 70), generator=torch.Generator().manual_seed(0))
    plain = prefill(model, ids)
    with make_press("kvzip", compression_ratio=0.5, compile=False)(model, tokenizer=ByteTokenizer()) as session:
        compressed = prefill(model, ids)
    assert session.selections, "nothing was compressed"
    recurrent = [idx for idx, layer in enumerate(plain.cache.layers) if getattr(layer, "keys", None) is None]
    assert recurrent, "no recurrent layer in the cache"
    for idx in recurrent:
        want, got = _non_attention_state(plain.cache.layers[idx]), _non_attention_state(compressed.cache.layers[idx])
        assert want.keys() == got.keys()
        for name in want:
            _assert_same_state(got[name], want[name], f"layer {idx} {name}")
    # The restored states keep their tensor kind: `generate` (no_grad, not inference mode) updates
    # them in place, which an inference tensor made during the pass would refuse.
    with make_press("kvzip", compression_ratio=0.5, compile=False)(model, tokenizer=ByteTokenizer()), torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)


def _assert_same_state(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_same_state(got[key], want[key], f"{where}[{key}]")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, msg=where)
    else:
        assert got == want, where


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 24), min_size=1, max_size=3), radius=st.integers(0, 4), seed=st.integers(0, 99))
def test_pooled_scores_take_the_best_real_neighbour(lengths, radius, seed):
    """kvzip(pool=r): the op against a plain loop; padding neither gives nor takes a score."""
    width = max(lengths)
    valid = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, width - n:] = True
    scores = torch.rand(len(lengths), 2, width, generator=torch.Generator().manual_seed(seed))
    pooled = max_pool_scores(scores, valid, radius)
    for b in range(len(lengths)):
        for t in range(width):
            if not valid[b, t]:
                assert torch.equal(pooled[b, :, t], scores[b, :, t])
                continue
            lo, hi = max(0, t - radius), min(width, t + radius + 1)
            near = scores[b, :, lo:hi].masked_fill(~valid[b, None, lo:hi], float("-inf"))
            assert torch.equal(pooled[b, :, t], near.amax(dim=-1))


@pytest.mark.parametrize("preset, apply", [("kvzip", "evict"), ("kvzip(pool=2)", "evict"), ("kvzip(observe=8)", "evict"),
                                           ("kvzip-observe(observe=8)", "evict"), ("kvzip(aligned=True)", "evict"),
                                           ("kvzip(local=True)", "evict"),
                                           ("chunkkv-kvzip", "evict"),
                                           ("chunkkv-kvzip", "mask")])
def test_padded_batch_rows_answer_as_alone(preset, apply):
    model = make_tiny_model("llama", num_layers=3)
    tokenizer = ByteTokenizer()
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 128, (50,), generator=gen), torch.randint(1, 128, (34,), generator=gen)]
    batch = torch.zeros(2, 50, dtype=torch.long)
    mask = torch.zeros(2, 50, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, 50 - len(row):] = row
        mask[i, 50 - len(row):] = 1
    press = make_press(preset, compression_ratio=0.6, pass_chunk_size=20) if preset.startswith("chunkkv-kvzip") else \
        make_press(preset, compression_ratio=0.6, chunk_size=20, allocator="adaptive")
    press = press.replace(apply=apply)
    question = torch.randint(1, 128, (2, 3), generator=gen)
    with press(model, tokenizer=tokenizer):
        together = greedy_continue(model, prefill(model, batch, mask), question, 6)
        for i, row in enumerate(rows):
            alone = greedy_continue(model, prefill(model, row[None]), question[i : i + 1], 6)
            assert together[i].tolist() == alone[0].tolist()


class ChatByteTokenizer(ByteTokenizer):
    """:class:`ByteTokenizer` with a chat template: ``<u>`` + message + ``</u><a>``."""

    chat_template = "<u>{content}</u><a>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.chat_template.format(content=messages[-1]["content"])


@pytest.mark.parametrize("preset", ["kvzip", "chunkkv-kvzip"])
def test_a_context_that_is_only_the_chat_prefix_is_scored_like_that_row_in_a_batch(preset):
    """Nothing to reconstruct (``generate_answers(context="")``: the chat template's prefix
    alone): the pass has no forward to run and every score is 0, as for that row beside a longer
    one. It ran a forward of 0 tokens, which raised deep in the model (hunt round 12)."""
    model = make_tiny_model("llama", num_layers=3)
    tokenizer = ChatByteTokenizer()
    prefix = torch.tensor(tokenizer("<u>").input_ids)
    other = torch.cat([prefix, torch.randint(1, 128, (30,), generator=torch.Generator().manual_seed(0))])
    batch = torch.zeros(2, len(other), dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0, -len(prefix):], mask[0, -len(prefix):] = prefix, 1
    batch[1], mask[1] = other, 1
    question = torch.randint(1, 128, (2, 3), generator=torch.Generator().manual_seed(1))
    with make_press(preset, compression_ratio=0.5)(model, tokenizer=tokenizer):
        together = teacher_forced_logits(model, prefill(model, batch, mask), question)
        alone = teacher_forced_logits(model, prefill(model, prefix[None]), question[:1])
    torch.testing.assert_close(together[0], alone[0], atol=1e-4, rtol=1e-4)


def test_missing_tokenizer_is_a_clear_error():
    model = make_tiny_model("llama", num_layers=2)
    with pytest.raises(SpecError, match="tokenizer"):
        with make_press("kvzip", compression_ratio=0.5)(model):
            pass


def test_kvzip_spec_round_trip_and_validation():
    press = make_press("chunkkv-kvzip(chunk_size=8, allocator='global', plus=True)", compression_ratio=0.75)
    assert make_press(press.to_spec()) == press
    assert press.selector.per_head and press.deferred
    with pytest.raises((SpecError, ValueError)):
        make_press("kvzip(chunk_size=4)", compression_ratio=0.5)
    with pytest.raises((SpecError, ValueError), match="pool"):
        make_press("kvzip(pool=-1)", compression_ratio=0.5)
    with pytest.raises((SpecError, ValueError), match="observe"):
        make_press("kvzip(observe=-1)", compression_ratio=0.5)


@pytest.mark.parametrize("padded", [False, True])
def test_observed_window_scores_are_the_largest_attention_of_either(padded):
    """kvzip(observe=w): each token's score is the larger of its reconstruction score and the
    largest attention any of the last w real queries (any head of its group) gives it, checked
    against a plain per-query, per-head loop over the softmax. A row's first real token's query
    does not count (it sees only itself)."""
    gen = torch.Generator().manual_seed(5)
    batch, kv_heads, groups, length, window, dim = 2, 3, 2, 40, 8, 16
    keys = torch.randn(batch, kv_heads, length, dim, generator=gen)
    queries = torch.randn(batch, kv_heads * groups, window, dim, generator=gen) / 2
    valid = torch.ones(batch, length, dtype=torch.bool)
    if padded:
        valid[1, :35] = False  # 5 real tokens: 3 window queries are padding
    context = torch.rand(batch, kv_heads, length, generator=gen) * 0.3 * valid[:, None]
    got = KVzipScorer(observe=window).score(keys, valid, context, window_queries=queries)
    want = context.clone()
    for b in range(batch):
        for h in range(kv_heads * groups):
            for i in range(window):
                pos = length - window + i
                if not valid[b, pos] or valid[b, :pos].sum() == 0:
                    continue
                seen = valid[b, : pos + 1]
                logits = (keys[b, h // groups, : pos + 1] @ queries[b, h, i]).masked_fill(~seen, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                want[b, h // groups, : pos + 1] = torch.maximum(want[b, h // groups, : pos + 1], probs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (got > context).any() and (got == context).any()  # both sides win somewhere


@pytest.mark.parametrize("apply", ["evict", "mask"])
def test_observed_queries_of_a_padded_row_shorter_than_the_window_are_those_of_the_row_alone(apply):
    """kvzip(observe=w) on a row of at most ``w`` tokens beside a longer one: alone, its window
    stops short of its first token (whose query sees only itself); padded, it reached it, so the
    first token scored 1 and was kept instead of another (hunt round 12, random-configuration
    fuzz: a 2-token row at 30% removed, sinks=0, logits 0.30 away from the row alone)."""
    model = make_tiny_model("llama", num_layers=4)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 128, (n,), generator=gen) for n in (2, 20)]
    question = torch.randint(1, 128, (2, 3), generator=gen)
    batch = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, 20 - len(row):], mask[i, 20 - len(row):] = row, 1
    press = make_press("kvzip(observe=8)", compression_ratio=0.3, chunk_size=20, sinks=0).replace(apply=apply)
    with press(model, tokenizer=ByteTokenizer()):
        together = teacher_forced_logits(model, prefill(model, batch, mask), question)
        for i, row in enumerate(rows):
            alone = teacher_forced_logits(model, prefill(model, row[None]), question[i : i + 1])
            torch.testing.assert_close(together[i], alone[0], atol=1e-4, rtol=1e-4)


def test_observed_queries_are_weighed_like_reconstruction_queries_under_kvzip_plus():
    """kvzip(observe=w, plus=True): the observed queries count as reconstruction queries, so
    KVzip+ weighs them alike: each query's probabilities divided by the norm of its hidden state,
    each key's multiplied by ``||W_O v||`` of the query head (a plain loop over the layer's own
    o_proj). Their raw probabilities were maxed with KVzip+ scores of another scale (hunt round
    12: on SmolLM2, 547 tokens at 75% removed, 5.9% of the kept (layer, head, token) entries
    changed with the fix)."""
    from kvpress_chunk.policies.layer_inputs import LayerInputs
    from kvpress_chunk.policies.scorers import window_queries

    model = make_tiny_model("llama", num_layers=1)
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(6)
    length, window, kv_heads, groups, dim = 24, 6, 2, 2, 16
    hidden = torch.randn(1, length, 64, generator=gen)
    keys, values = torch.randn(2, 1, kv_heads, length, dim, generator=gen)
    rope = model.model.rotary_emb(hidden, torch.arange(length)[None])
    valid = torch.ones(1, length, dtype=torch.bool)
    inputs = LayerInputs(module, 0, hidden, keys, values, valid, rope,
                         context_scores=torch.zeros(1, kv_heads, length))
    scorer = KVzipScorer(observe=window, plus_normalization=True)
    got = scorer.score(keys, valid, **scorer.prepare(inputs))
    queries = window_queries(inputs, window)  # [1, Hq, w, D], post-RoPE and scaled
    weight = module.o_proj.weight
    want = torch.zeros(1, kv_heads, length)
    for h in range(kv_heads * groups):
        kv = h // groups
        written = (values[0, kv] @ weight[:, h * dim : (h + 1) * dim].T).norm(dim=-1)  # [T]
        for i in range(window):
            pos = length - window + i
            probs = torch.softmax(keys[0, kv, : pos + 1] @ queries[0, h, i], dim=-1)
            weighed = probs / hidden[0, pos].norm() * written[: pos + 1]
            want[0, kv, : pos + 1] = torch.maximum(want[0, kv, : pos + 1], weighed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_kvzip_observe_preset_is_aligned_kvzip_with_32_observed_queries():
    ours = make_press("kvzip-observe", compression_ratio=0.5)
    spelled = make_press("kvzip(observe=32, aligned=True)", compression_ratio=0.5)
    assert (ours.scorer, ours.grouper, ours.selector, ours.allocator) == (spelled.scorer, spelled.grouper,
                                                                          spelled.selector, spelled.allocator)
    assert make_press("kvzip-observe(observe=8, recent=4)", compression_ratio=0.5).scorer.observe == 8


@pytest.mark.parametrize("preset", ["kvzip", "kvzip-observe", "chunkkv-kvzip"])
def test_every_kvzip_preset_takes_the_local_pass(preset):
    """``local`` (the cheaper pass) reaches the scorer from each KVzip preset; chunkkv-kvzip and
    kvzip-observe refused it as an unknown parameter (seen by hunt round 12)."""
    assert make_press(f"{preset}(local=True)", compression_ratio=0.5).scorer.local
    assert not make_press(preset, compression_ratio=0.5).scorer.local


def test_aligned_reconstruction_continues_positions_across_chunks():
    """``continue_positions``: chunk c's first copied token sits c * chunk_size after chunk 0's
    (the copy distance is the same for every chunk, whatever each chunk's prompt); the tokens and
    the spans scored do not change."""
    tokenizer = ByteTokenizer()
    tokens = [t % 120 + 1 for t in range(250)]
    ids, valid = torch.tensor([tokens]), torch.ones(1, 250, dtype=torch.bool)
    restart = KVzipScorer(chunk_size=100).pass_chunks(tokenizer, ids, valid)
    aligned = KVzipScorer(chunk_size=100, continue_positions=True).pass_chunks(tokenizer, ids, valid)
    assert len(restart) == len(aligned) == 3
    for c, (r, a) in enumerate(zip(restart, aligned)):
        assert torch.equal(a.input_ids, r.input_ids) and torch.equal(a.start, r.start) and torch.equal(a.end, r.end)
        assert torch.equal(a.positions[:, 1:] - a.positions[:, :-1], r.positions[:, 1:] - r.positions[:, :-1])
    # the copy distance (query position - copied token's position) is the same in every chunk
    distances = set()
    for chunk in aligned:
        width = int(chunk.end[0] - chunk.start[0])
        copied = torch.arange(int(chunk.start[0]), int(chunk.end[0]))
        distances |= set((chunk.positions[0, -width:] - copied).tolist())
    assert len(distances) == 1


@pytest.mark.parametrize("chunk_size", [9, 16, 30])
def test_aligned_reconstruction_never_starts_inside_the_contexts_positions(chunk_size):
    """A chunk shorter than its prompt's extra length (the "starting with" prompt and the
    overlap against the first prompt) would have moved its prompt back into the context's
    positions: reconstruction tokens at positions the context already holds (byte tokenizer,
    chunks of 16: the second chunk started 18 positions before the context's end, the third 2). Such chunks
    take the restart positions."""
    tokenizer = ByteTokenizer()
    ids, valid = torch.tensor([[t % 120 + 1 for t in range(80)]]), torch.ones(1, 80, dtype=torch.bool)
    for chunk in KVzipScorer(chunk_size=chunk_size, continue_positions=True).pass_chunks(tokenizer, ids, valid):
        assert int(chunk.positions.min()) >= 80


def test_aligned_kvzip_equals_kvzip_on_a_context_of_one_chunk():
    model = make_tiny_model("llama", num_layers=2)
    tokenizer = ByteTokenizer()
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    kept = {}
    for spec in ("kvzip", "kvzip(aligned=True)"):
        with make_press(spec, compression_ratio=0.5, chunk_size=64)(model, tokenizer=tokenizer) as session:
            prefill(model, ids)
        kept[spec] = {layer: sel.indices.tolist() for layer, sel in session.selections.items()}
    assert kept["kvzip"] == kept["kvzip(aligned=True)"]


def test_aligned_reconstruction_stays_within_the_models_positions():
    """A chunk whose continued positions would pass ``max_position_embeddings`` moves back just
    enough to end inside it (never before the restart positions)."""
    tokenizer = ByteTokenizer()
    ids, valid = torch.tensor([[t % 120 + 1 for t in range(300)]]), torch.ones(1, 300, dtype=torch.bool)
    scorer = KVzipScorer(chunk_size=100, continue_positions=True)
    free = scorer.pass_chunks(tokenizer, ids, valid)
    limit = int(free[-1].positions.max()) - 5
    bounded = scorer.pass_chunks(tokenizer, ids, valid, max_positions=limit)
    restart = KVzipScorer(chunk_size=100).pass_chunks(tokenizer, ids, valid)
    assert int(free[-1].positions.max()) > int(restart[-1].positions.max())  # the case moves a chunk
    for f, b, r in zip(free, bounded, restart):
        assert int(b.positions.max()) <= max(limit, int(r.positions.max()))
        assert torch.equal(b.positions, f.positions) or int(b.positions.max()) >= int(r.positions.max())
    assert not torch.equal(bounded[-1].positions, free[-1].positions)


def test_aligned_reconstruction_of_a_padded_row_near_the_position_limit_equals_the_row_alone():
    """``continue_positions`` near ``max_position_embeddings``: a row's chunk moves back by what
    *its own* sequence needs, not the batch's widest (hunt round 12: a 260-token row beside a
    300-token one, chunks of 100, limit 560, sat 40 positions earlier than alone in its last
    chunk; tiny Llama at 80% removed answered 0.05-0.09 away from the row alone in the logits)."""
    tokenizer = ByteTokenizer()
    scorer = KVzipScorer(chunk_size=100, continue_positions=True)
    long_row, short_row = [t % 120 + 1 for t in range(300)], [t % 100 + 3 for t in range(260)]
    ids = torch.tensor([long_row, [0] * 40 + short_row])
    for limit in (500, 560):
        batch_chunks = scorer.pass_chunks(tokenizer, ids, ids != 0, max_positions=limit)
        for row, tokens in enumerate((long_row, short_row)):
            alone = scorer.pass_chunks(tokenizer, torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.bool),
                                       max_positions=limit)
            for chunk, own in zip(batch_chunks, alone):
                real = chunk.valid[row]
                assert chunk.positions[row][real].tolist() == own.positions[0].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_pass_scores_equal_the_models_own_attention_maxed_over_reconstruction_queries(family, monkeypatch):
    """The end-to-end oracle: one chunk, no chat prefix, no sinks, so each reconstruction query's
    softmax runs over the whole context and the reconstruction tokens: exactly the model's own
    attention in one eager forward over ``context + repeat prompt + context``. A token's score must
    be its largest attention probability from any reconstruction query of its GQA group. Gemma 3's
    context (60 tokens) passes its 32-token sliding window, so its full layers are scored while
    sliding layers run the pass beside them."""
    import kvpress_chunk.session as session_module

    model = make_tiny_model(family, num_layers=4)
    tokenizer, length = ByteTokenizer(), 60
    ids = torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(1))
    scores = {}
    run_pass = session_module.run_context_pass
    monkeypatch.setattr(session_module, "run_context_pass", lambda *a, **k: scores.update(run_pass(*a, **k)) or scores)
    with make_press("kvzip", compression_ratio=0.5, chunk_size=4096, sinks=0)(model, tokenizer=tokenizer) as session:
        prefill(model, ids)
    assert sorted(scores) == sorted(session.selections) and scores
    prompt = torch.tensor([tokenizer(FIRST_PROMPT + "\n").input_ids])
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(torch.cat([ids, prompt, ids], dim=-1), output_attentions=True).attentions
    kv_heads = model.config.num_key_value_heads
    for layer_idx, ours in scores.items():
        probs = attentions[layer_idx][0, :, length:, :length]  # [Hq, reconstruction queries, context]
        expected = probs.amax(dim=1).view(kv_heads, -1, length).amax(dim=1)
        torch.testing.assert_close(ours[0], expected, atol=1e-6, rtol=1e-5)

"""The queries the scorers rebuild are the model's own, family by family (reviewer findings F1, F2).

Every query-reading scorer (snapkv/chunkkv, tova, observed, expected-attention, kvzip) re-projects
the layer's hidden states into queries (:mod:`kvpress_chunk.policies.queries`). Done the Llama way
on a family that does otherwise, the scores are wrong with no error. Here a tiny random model of
each family (eager attention) runs a prefill under a snapkv press; the library's window attention,
recomputed from what the scorer prepares, must equal the attention probabilities the model itself
computed (the attention module's output ``[1]``). Families whose queries cannot be rebuilt must be
refused with :class:`UnsupportedModelError`. A family missing from the installed transformers is
skipped.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import kvpress_chunk as kc
from kvpress_chunk.policies.expected_attention import ExpectedAttentionScorer
from kvpress_chunk.policies.scorers import SnapKVScorer, observation_window_attention, query_states
from kvpress_chunk.session import PressSession

WINDOW, LENGTH = 8, 32
BASE = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=64, num_hidden_layers=2, max_position_embeddings=512, initializer_range=0.3)
TWO_FULL = {"layer_types": ["full_attention", "full_attention"]}

# name -> (model_type, config overrides). The comment says what the Llama-style rebuild got wrong.
FAMILIES = {
    # logit soft cap ignored (cap 1: max|dp| 0.97); query_pre_attn_scalar != head_dim checks the scaling
    "gemma2-softcap": ("gemma2", {"sliding_window": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 1.0}),
    "vaultgemma-softcap": ("vaultgemma", {**TWO_FULL, "attn_logit_softcapping": 1.0}),
    # interleaved RoPE (pairs, not halves): max|dp| ~1
    "cohere": ("cohere", {"use_qk_norm": False}),
    "cohere-qk-norm": ("cohere", {"use_qk_norm": True}),  # a LayerNorm over (heads, head dim)
    "helium": ("helium", {}),
    "ernie4_5": ("ernie4_5", {}),
    # NoPE layers rotated anyway
    "cohere2": ("cohere2", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16}),
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0], "use_sliding_window": False, "pad_token_id": 0}),
    # query norm after RoPE ignored
    "hunyuan_v1_dense": ("hunyuan_v1_dense", {}),
    # gated q_proj: (query, gate) per head
    "qwen3_next": ("qwen3_next", {**TWO_FULL, "num_experts": 2, "num_experts_per_tok": 1}),
    "qwen3_5_text": ("qwen3_5_text", TWO_FULL),  # transformers >= 5.2x
    "cohere2_moe": ("cohere2_moe", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16}),
    # raw shape errors before: full-width query norm, partial rotary
    "olmo2": ("olmo2", {}),
    "phi-partial": ("phi", {"partial_rotary_factor": 0.5}),
    "stablelm-partial-qk-norm": ("stablelm", {"partial_rotary_factor": 0.5, "qk_layernorm": True}),
    "glm": ("glm", {"pad_token_id": 0}),
    "glm4": ("glm4", {"pad_token_id": 0}),
    "phi3-partial": ("phi3", {"partial_rotary_factor": 0.5, "pad_token_id": 0}),
    # q_layernorm applied with no qk_layernorm flag: taken for absent (max|dp| 0.5)
    "lfm2": ("lfm2", TWO_FULL),
    "llama": ("llama", {}),  # the reference family stays exact
}

REFUSED = {
    "gpt_oss": ("gpt_oss", {**TWO_FULL, "num_local_experts": 2, "num_experts_per_tok": 1}, "attention sinks"),
    "llama4_text": ("llama4_text", {"no_rope_layers": [1, 0], "attention_chunk_size": 10000, "num_local_experts": 2,
                                    "interleave_moe_layer_step": 1, "intermediate_size_mlp": 64}, "Llama4"),
    "zaya": ("zaya", {}, "query projection"),  # its q_proj reads the cache
}


def build(model_type: str, overrides: dict):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers has no {model_type!r} model in this version")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def prefill(model, scorer: str, monkeypatch) -> tuple[dict, dict]:
    """``(LayerInputs per compressed layer, the model's attention probabilities per layer)``."""
    captured, real = {}, {}
    original = PressSession._select_and_apply

    def spy(self, layer_idx, layer, inputs):
        captured[layer_idx] = inputs
        return original(self, layer_idx, layer, inputs)

    monkeypatch.setattr(PressSession, "_select_and_apply", spy)
    handles = []
    for idx, module in kc.find_attention_layers(model):
        def keep(_module, _args, _kwargs, out, idx=idx):
            if isinstance(out, tuple) and len(out) > 1 and out[1] is not None:
                real[idx] = out[1].detach().float()
        handles.append(module.register_forward_hook(keep, with_kwargs=True))
    ids = torch.randint(3, 120, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    press = kc.make_press({"scorer": scorer, "grouper": "token", "selector": "topk", "compression_ratio": 0.5,
                           "compile": False})
    try:
        with press(model), torch.no_grad():
            model(ids, past_key_values=DynamicCache(config=model.config))
    finally:
        for handle in handles:
            handle.remove()
    return captured, real


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_window_attention_is_the_models(name, monkeypatch):
    model = build(*FAMILIES[name])
    captured, real = prefill(model, {"name": "snapkv", "window": WINDOW}, monkeypatch)
    assert captured, "no layer was compressed"
    scorer = SnapKVScorer(window=WINDOW)
    for idx, inputs in captured.items():
        extra = scorer.prepare(inputs)
        with torch.no_grad():
            capped = (extra["softcap"],) if "softcap" in extra else ()  # soft-capped families only
            lib = observation_window_attention(extra["queries"], inputs.keys, inputs.valid, *capped)
        batch, kv_heads, groups, window, length = lib.shape
        model_probs = real[idx][..., -WINDOW:, :length].reshape(batch, kv_heads, groups, window, length)
        assert (lib - model_probs).abs().max().item() < 1e-4, f"layer {idx}"


# Expected attention rotates the mean and covariance of the pre-RoPE queries by a matrix: it must
# be the model's rotation (interleaved, partial, none on NoPE layers) and read the gated projection
# right. future=1: the rotation of the next position, which the model's rotary embedding gives.
EXPECTED = ["cohere", "helium", "ernie4_5", "glm", "phi-partial", "phi3-partial", "smollm3", "cohere2", "qwen3_next",
            "qwen3_5_text", "llama"]


@pytest.mark.parametrize("name", EXPECTED)
def test_expected_attention_rotation_is_the_models(name, monkeypatch):
    import sys

    model = build(*FAMILIES[name])
    captured, _ = prefill(model, {"name": "expected-attention"}, monkeypatch)
    scorer = ExpectedAttentionScorer(future=1, sinks=0)
    rotary = model.model.rotary_emb
    for idx, inputs in captured.items():
        module = inputs.module
        with torch.no_grad():
            mean, _ = scorer.statistics(inputs)
            queries = query_states(module, inputs.hidden_states)  # no projection reuse: the reference
            pre = queries.float().mean(dim=2, keepdim=True)  # [B, Hq, 1, D]
            cos, sin = rotary(inputs.hidden_states, torch.tensor([[LENGTH]]))
        nope = name in ("smollm3", "cohere2") and idx == 1
        if nope:
            expected = pre
        elif getattr(module, "rotary_ndims", None):  # Phi: the first dims, outside the function
            apply = sys.modules[type(module).__module__].apply_rotary_pos_emb
            rot = module.rotary_ndims
            expected = torch.cat([apply(pre[..., :rot], pre[..., :rot], cos, sin)[0], pre[..., rot:]], dim=-1)
        else:
            apply = sys.modules[type(module).__module__].apply_rotary_pos_emb
            expected = apply(pre, pre, cos, sin)[0]
        expected = expected[:, :, 0] * module.scaling
        torch.testing.assert_close(mean, expected, atol=1e-4, rtol=1e-4, msg=f"layer {idx}")


def test_expected_attention_refuses_a_query_norm_after_rope(monkeypatch):
    model = build(*FAMILIES["hunyuan_v1_dense"])
    with pytest.raises(kc.UnsupportedModelError, match="after RoPE"):
        prefill(model, {"name": "expected-attention"}, monkeypatch)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unrebuildable_families_are_refused(name, monkeypatch):
    model_type, overrides, reason = REFUSED[name]
    model = build(model_type, overrides)
    with pytest.raises(kc.UnsupportedModelError, match=reason) as info:
        prefill(model, {"name": "snapkv", "window": WINDOW}, monkeypatch)
    assert "knorm" in str(info.value)  # says what to use instead
    for scorer in ("tova", "observed", "expected-attention", "kvzip"):  # every query-reading scorer, at entry
        press = kc.make_press({"scorer": scorer, "grouper": "token", "selector": "topk", "compression_ratio": 0.5})
        with pytest.raises(kc.UnsupportedModelError, match=reason):
            with press(model, tokenizer=object()):
                pass
    with kc.make_press("knorm", compression_ratio=0.5)(model):  # a query-free scorer is welcome
        pass


def test_a_query_norm_of_an_unknown_name_is_refused(monkeypatch):
    """A norm on the queries under a name the rebuild does not read (Muse Spark's weightless
    ``qk_norm``, IDEFICS' ``q_layer_norm``) was skipped: scores for other queries than the
    model's, no error. Simulated on Llama: every query-reading scorer refuses it, knorm runs."""
    model = build("llama", {})
    for _, module in kc.find_attention_layers(model):
        module.qk_norm = torch.nn.LayerNorm(16)
    with pytest.raises(kc.UnsupportedModelError, match="qk_norm"):
        prefill(model, {"name": "snapkv", "window": WINDOW}, monkeypatch)
    with kc.make_press("knorm", compression_ratio=0.5)(model):
        pass


def test_softcap_reaches_the_fused_ops():
    """The custom ops (snapkv, observed) cap the logits as their plain twins do."""
    from kvpress_chunk.policies.scorers import ObservedAttentionScorer
    from kvpress_chunk.policies.window_attention import snapkv_scores_traced

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 40, 16, generator=generator) * 3
    queries = torch.randn(2, 4, 8, 16, generator=generator) * 3
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :5] = False
    cap = torch.tensor(1.0)
    snap = SnapKVScorer(window=8)
    fused = snap.score(keys, valid, queries, cap)
    torch.testing.assert_close(fused, snap.score_reference(keys, valid, queries, cap))
    torch.testing.assert_close(fused, snapkv_scores_traced(queries, keys, valid, 5, "zero", cap))
    assert not torch.allclose(fused, snap.score(keys, valid, queries))
    observed = ObservedAttentionScorer(queries=8)
    torch.testing.assert_close(observed.score(keys, valid, queries, cap), observed.score_reference(keys, valid, queries, cap))


def test_kvzip_reconstruction_scores_cap_the_logits():
    """KVzip's pass scores soft-capped logits as the model attends (Gemma 2): the fused op (which
    leaves the flash kernel for the plain reduction then) against a query-by-query softmax."""
    from kvpress_chunk.policies.kvzip import reconstruction_attention_max

    generator = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, length, n, sinks, cap = 1, 2, 2, 12, 5, 2, 1.0
    queries = torch.randn(batch, kv_heads * groups, n, 8, generator=generator) * 3
    keys = torch.randn(batch, kv_heads, length + n, 8, generator=generator) * 3
    context_valid = torch.ones(batch, length, dtype=torch.bool)
    query_valid = torch.ones(batch, n, dtype=torch.bool)
    start, end = torch.tensor([4]), torch.tensor([10])
    got = reconstruction_attention_max(queries, keys, context_valid, query_valid, start, end, sinks, softcap=cap)
    want = torch.zeros(batch, kv_heads, length)
    for i in range(n):
        allowed = list(range(sinks)) + list(range(4, 10)) + [length + k for k in range(i + 1)]
        for h in range(kv_heads * groups):
            logits = torch.stack([queries[0, h, i] @ keys[0, h // groups, j] for j in allowed])
            probs = torch.softmax(torch.tanh(logits / cap) * cap, dim=0)
            for p, j in zip(probs, allowed):
                if j < length:
                    want[0, h // groups, j] = max(float(want[0, h // groups, j]), float(p))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    uncapped = reconstruction_attention_max(queries, keys, context_valid, query_valid, start, end, sinks)
    assert (uncapped - want).abs().max() > 1e-2

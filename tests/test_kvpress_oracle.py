"""`chunkkv-kvpress` against NVIDIA kvpress itself, the oracle: same kept tokens, same cache.

kvpress breaks ties between equal chunk scores with ``torch.topk`` (order unspecified); we break
them toward the earlier chunk. Ties happen only among chunks lying wholly inside the observation
window (all scored max+1), so the cases below keep more chunks than the window holds.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpress_chunk as kc
from kvpress_chunk.policies import LayerInputs

kvpress = pytest.importorskip("kvpress", reason="kvpress is installed only in the pinned CI run (extra 'oracle')")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, num_hidden_layers=3, max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval()


def safe_from_ties(length, chunk, ratio, window):
    n_chunks = -(-length // chunk)
    kept = max(1, int(n_chunks * (1 - ratio)))
    return kept > window // chunk + 1


TIE_FREE_CASES = [
    (length, ratio, chunk)
    for length in (400, 517, 1000, 2048)
    for ratio in (0.25, 0.5, 0.75, 0.9)
    for chunk in (10, 20)
    if safe_from_ties(length, chunk, ratio, window=64)
]


@pytest.mark.parametrize("length,ratio,chunk", TIE_FREE_CASES)
def test_layer_op_matches_kvpress_on_random_tensors(length, ratio, chunk):
    model = tiny_llama()
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(length + chunk)
    hidden = torch.randn(1, length, 64, generator=generator)
    keys = torch.randn(1, 2, length, 16, generator=generator)
    values = torch.randn(1, 2, length, 16, generator=generator)
    positions = torch.arange(length)[None]
    cos_sin = model.model.rotary_emb(hidden, positions)
    reference = kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=ratio), chunk_length=chunk)
    want_keys, want_values = reference.compress(module, hidden, keys, values, None, {"position_embeddings": cos_sin})

    press = kc.make_press("chunkkv-kvpress", chunk_length=chunk, compression_ratio=ratio, compile=False)
    valid = torch.ones(1, length, dtype=torch.bool)
    inputs = LayerInputs(module, 0, hidden, keys, values, valid, cos_sin)
    got_keys, got_values, selection = press.select(inputs)
    assert torch.equal(got_keys, want_keys) and torch.equal(got_values, want_values)
    assert selection.indices.shape[-1] == want_keys.shape[2]


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_whole_model_cache_matches_kvpress(ratio):
    model = tiny_llama(1)
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(3))
    reference_cache, our_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    reference = kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=ratio), chunk_length=20)
    with torch.no_grad():
        with reference(model):
            model(ids, past_key_values=reference_cache)
        with kc.make_press("chunkkv-kvpress", compression_ratio=ratio, compile=False)(model):
            model(ids, past_key_values=our_cache)
    for ref_layer, our_layer in zip(reference_cache.layers, our_cache.layers):
        assert torch.equal(ref_layer.keys, our_layer.keys)
        assert torch.equal(ref_layer.values, our_layer.values)


@pytest.mark.parametrize("preset,reference", [
    ("knorm", lambda r: kvpress.KnormPress(compression_ratio=r)),
    ("streamingllm", lambda r: kvpress.StreamingLLMPress(compression_ratio=r)),
])
def test_token_level_presets_keep_what_kvpress_keeps(preset, reference):
    """kvpress gathers in score order, we in position order: compare the kept sets per head.

    Distinct token ids: RoPE preserves norms, so a repeated token has tied key norms in layer 0
    and the two libraries may break that tie differently."""
    model = tiny_llama(2)
    ids = torch.randperm(128, generator=torch.Generator().manual_seed(4))[None, :120]
    ref_cache, our_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        with reference(0.6)(model):
            model(ids, past_key_values=ref_cache)
        with kc.make_press(preset, compression_ratio=0.6, compile=False)(model):
            model(ids, past_key_values=our_cache)
    for ref_layer, our_layer in zip(ref_cache.layers, our_cache.layers):
        assert ref_layer.keys.shape == our_layer.keys.shape
        for head in range(ref_layer.keys.shape[1]):
            ref_rows = {tuple(row.tolist()) for row in ref_layer.keys[0, head]}
            our_rows = {tuple(row.tolist()) for row in our_layer.keys[0, head]}
            assert ref_rows == our_rows


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_a_kvpress_key_masking_press_reports_what_it_keeps(ratio):
    """kvpress' AdaKV masks keys in place (``masked_key_indices``) and leaves the cache at full
    length: the context reported every token as kept, so the leaderboard's kept-token column
    said kvpress' AdaKV at 0.9 kept all of them."""
    from kvpress_chunk.generation import prefill

    model = tiny_llama()
    ids = torch.randint(3, 120, (1, 300), generator=torch.Generator().manual_seed(4))
    context = prefill(model, ids, press=kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio)))
    assert context.cache.get_seq_length() == 300  # masked, not evicted
    masks = [layer.self_attn.masked_key_indices for layer in model.model.layers]
    masked_per_layer = [mask[0].numel() / 2 for mask in masks]  # over 2 KV heads
    expected = round(300 - sum(masked_per_layer) / len(masks))
    assert abs(int(context.kept_per_row()[0]) - round(300 * (1 - ratio))) <= 1
    assert int(context.kept_per_row()[0]) == expected
    assert int(context.copy().kept_per_row()[0]) == expected
    model.set_attn_implementation("eager")  # kvpress patches the registered attentions, not eager:
    plain = prefill(model, ids)  # its stale mask must not be read as this prefill's
    assert int(plain.kept_per_row()[0]) == 300


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_kvpress_evicting_press_reports_the_mean_over_its_full_attention_layers(family):
    """The cache's length is its first layer's: kvpress' PyramidKV (most tokens in the first
    layer) reported 284 kept for a mean of 150, and on Gemma 3, whose first layer slides, every
    kvpress press reported all 300 tokens kept."""
    import warnings

    from kvpress_chunk.generation import prefill
    from tiny_models import make_tiny_model

    model = make_tiny_model(family)
    ids = torch.randint(3, 120, (1, 300), generator=torch.Generator().manual_seed(1))
    for press in (kvpress.PyramidKVPress(compression_ratio=0.5, window_size=16),
                  kvpress.SnapKVPress(compression_ratio=0.5, window_size=16)):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Model .* not tested")
            context = prefill(model, ids, press=press)
        full = [layer.keys.shape[-2] for layer in context.cache.layers if not getattr(layer, "is_sliding", False)]
        assert int(context.kept_per_row()[0]) == round(sum(full) / len(full)) < 300


def test_a_context_kvpress_masked_stays_masked_after_another_prefill_and_is_not_saved(tmp_path):
    """kvpress' AdaKV masks keys on the model's attention modules, not in the cache. A context
    continued after another prefill (which replaces or, ours, clears those masks) attended to
    every key: the full cache's answer while reporting 24 of 80 tokens kept; and a saved one
    loaded without them, silently. The context now carries its masks for its continuations,
    and saving it is refused."""
    from kvpress_chunk.generation import greedy_continue, prefill
    from kvpress_chunk.saved_context import SavedContextError

    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    ids, other, question = (torch.randint(3, 128, (1, n), generator=generator) for n in (80, 80, 4))
    context = prefill(model, ids, press=kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.7)))
    want = greedy_continue(model, context.copy(), question, 8)  # right after its prefill: masked
    full = greedy_continue(model, prefill(model, ids), question, 8)
    assert not torch.equal(want, full)  # the masks matter for this case
    prefill(model, other, press=kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.3)))  # other masks
    assert torch.equal(greedy_continue(model, context.copy(), question, 8), want)
    prefill(model, other)  # no masks at all
    assert torch.equal(greedy_continue(model, context, question, 8), want)
    with pytest.raises(SavedContextError, match="masks its keys"):
        context.save(tmp_path / "masked.safetensors", model)

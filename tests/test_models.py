"""The press on real (tiny, randomly initialised) HF models: hooks, caches, decoding, batches."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_chunk as kc
from kvpress_chunk.generation import greedy_continue, prefill
from tiny_models import TINY_FAMILIES, make_tiny_model

FULL_ATTENTION_FAMILIES = [f for f in TINY_FAMILIES if f not in ("gemma2", "gemma3")]
LENGTH = 200


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request):
    return request.param, make_tiny_model(request.param)


def prompt(length=LENGTH, batch=1, seed=0, vocab=120):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, ids, press=None, **kwargs):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        if press is None:
            out = model(ids, past_key_values=cache, **kwargs)
            return out, cache, None
        with press(model) as session:
            out = model(ids, past_key_values=cache, **kwargs)
    return out, cache, session


def is_sliding(cache, idx):
    return getattr(cache.layers[idx], "is_sliding", False)


def test_every_full_attention_layer_is_compressed(family_model):
    family, model = family_model
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False)
    _, cache, session = run(model, prompt(), press)
    kept = int(LENGTH * 0.25)
    compressed = [i for i in range(len(cache.layers)) if not is_sliding(cache, i)]
    assert compressed, f"{family}: no layer was compressed"
    for idx, layer in enumerate(cache.layers):
        if idx in compressed:
            assert layer.keys.shape[-2] == kept and layer.values.shape[-2] == kept
            assert session.selections[idx].kept_per_row.tolist() == [kept]
        else:
            assert idx in session.skipped_layers
    assert set(session.selections) == set(compressed)


@pytest.mark.parametrize("family", FULL_ATTENTION_FAMILIES)
def test_decoding_after_eviction_matches_masking_the_full_cache(family):
    """Oracle for RoPE positions: one selection for all layers (reuse every layer), then the
    next token's logits must equal those of the uncompressed model with the evicted tokens
    masked out. A position shift after eviction would break this."""
    model = make_tiny_model(family)
    layers = len(kc.find_attention_layers(model))
    press = kc.make_press("chunkkv", compression_ratio=0.6, reuse_every=layers, compile=False)
    ids = prompt()
    _, compressed, session = run(model, ids, press)
    _, full, _ = run(model, ids)
    kept = session.selections[0].indices[0, 0]
    mask = torch.zeros(1, LENGTH + 3, dtype=torch.long)
    mask[0, kept] = 1
    mask[0, LENGTH:] = 1
    step = torch.tensor([[5, 17, 42]])
    positions = torch.arange(LENGTH, LENGTH + 3)[None]
    with torch.no_grad():
        got = model(step, past_key_values=compressed, position_ids=positions).logits
        want = model(step, past_key_values=full, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Without the right positions the logits would differ: the oracle is sharp.
    _, compressed2, _ = run(model, ids, press)
    with torch.no_grad():
        shifted = model(step, past_key_values=compressed2).logits  # positions from the short cache
    exact_error = (got - want).abs().max()
    shifted_error = (shifted - want).abs().max()
    assert shifted_error > 1e-5 and shifted_error > 20 * exact_error


def test_ratio_zero_and_full_budget_leave_logits_bit_identical(family_model):
    family, model = family_model
    ids = prompt()
    base_out, base_cache, _ = run(model, ids)
    step = torch.tensor([[7]])
    with torch.no_grad():
        base_next = model(step, past_key_values=base_cache).logits
    for press in (
        kc.make_press("chunkkv", compression_ratio=0.0, compile=False),
        kc.make_press("chunkkv", budget=LENGTH, compile=False),
        kc.make_press("snapkv", budget=10_000, compile=False),
    ):
        out, cache, _ = run(model, ids, press)
        assert torch.equal(out.logits, base_out.logits)
        with torch.no_grad():
            assert torch.equal(model(step, past_key_values=cache).logits, base_next)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("preset", ["chunkkv", "snapkv"])
def test_batch_rows_get_their_own_selection_identical_to_alone(family, preset):
    model = make_tiny_model(family)
    press = kc.make_press(preset, compression_ratio=0.7, compile=False)
    lengths = [150, 97, 181]
    rows = [prompt(n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    with press(model) as session:
        batched = prefill(model, ids, mask)  # the active hooks compress this prefill
    batch_selections = session.selections
    question = torch.tensor([[11, 12, 13]] * len(rows))
    batch_tokens = greedy_continue(model, batched.copy(), question, max_new_tokens=4)
    for r, row in enumerate(rows):
        pad = width - len(row)
        with press(model) as alone_session:
            alone = prefill(model, row[None])
        for idx, sel in alone_session.selections.items():
            together = batch_selections[idx]
            for head in range(sel.indices.shape[1]):
                mine = together.indices[r, head][together.slot_valid[r, head]] - pad
                assert torch.equal(mine, sel.indices[0, head]), f"row {r} layer {idx} head {head}"
            # Left padding is never kept.
            assert bool((together.indices[r][together.slot_valid[r]] >= pad).all())
        alone_tokens = greedy_continue(model, alone, question[:1], max_new_tokens=4)
        assert torch.equal(batch_tokens[r], alone_tokens[0])
        # The row's cache holds the same keys as when it is alone.
        layer = 0
        kept = batched.layer_views[layer].visible[r, 0]
        torch.testing.assert_close(
            batched.cache.layers[layer].keys[r][:, kept], alone.cache.layers[layer].keys[0][:, : int(kept.sum())],
            rtol=1e-4, atol=1e-5,
        )


def test_reuse_planner_shares_one_selection_per_group():
    model = make_tiny_model("llama", num_layers=5)
    press = kc.make_press("chunkkv", compression_ratio=0.75, reuse_every=2, compile=False)
    _, _, session = run(model, prompt(), press)
    sel = session.selections
    assert sel[1] is sel[0] and sel[3] is sel[2]
    assert sel[2] is not sel[0] and sel[4] is not sel[2]
    assert not torch.equal(sel[0].indices, sel[2].indices)  # layers really select afresh



@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_reuse_groups_consecutive_compressed_layers_when_sliding_layers_sit_between(family):
    """Sliding-window layers are never compressed, so ``reuse_every`` groups the compressed ones.
    Grouped by layer index, layer 3's group leader was sliding layer 2: on Gemma 2/3 every full
    layer selected afresh, so ``reuse_every=2`` changed nothing (no reuse, no saving), silently."""
    model = make_tiny_model(family, num_layers=8)  # full-attention layers 1, 3, 5, 7
    press = kc.make_press("chunkkv", compression_ratio=0.75, reuse_every=2, compile=False)
    ids = prompt()
    _, cache, session = run(model, ids, press)
    sel = session.selections
    assert sorted(sel) == [1, 3, 5, 7]
    assert sel[3] is sel[1] and sel[7] is sel[5]
    assert sel[5] is not sel[1] and not torch.equal(sel[5].indices, sel[1].indices)  # groups select afresh
    # The reused layers hold their own keys at the leader's kept positions: evict == mask mode.
    with torch.no_grad():
        evicted = greedy_continue(model, prefill(model, ids, press=press), ids[:, :3], max_new_tokens=4)
        hidden = greedy_continue(model, prefill(model, ids, press=press.replace(apply="mask")), ids[:, :3], max_new_tokens=4)
    assert torch.equal(evicted, hidden)

def test_layers_are_compressed_one_by_one_so_the_full_cache_is_never_alive():
    """Each layer is evicted right after its attention runs: at any point of the prefill the
    cache holds the compressed earlier layers plus one uncompressed layer, never all of them."""
    model = make_tiny_model("llama", num_layers=6)
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False)
    seen = []

    def probe(module, args, kwargs, output):  # registered first: runs before the press's hook
        cache = kc.hf.hooks.cache_argument(args, kwargs)
        seen.append(sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None))

    handles = [module.register_forward_hook(probe, with_kwargs=True) for _, module in kc.find_attention_layers(model)]
    try:
        _, cache, _ = run(model, prompt(), press)
    finally:
        for handle in handles:
            handle.remove()
    one_layer = cache.layers[0].keys.nbytes * 4 * 2  # an uncompressed layer: 4x the kept keys, K and V
    kept_total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert max(seen) == kept_total - one_layer // 4 + one_layer  # the last layer, still whole
    assert max(seen) < one_layer * len(cache.layers) / 2


def test_compress_layer_without_hooks_follows_the_planner():
    """``Press.compress_layer`` (what the hooks call) reuses the source layer's selection."""
    model = make_tiny_model("llama", num_layers=4)
    press = kc.make_press("chunkkv", compression_ratio=0.75, reuse_every=2, compile=False)
    _, _, session = run(model, prompt(), press)
    keys = torch.randn(1, model.config.num_key_value_heads, LENGTH, model.config.head_dim)
    inputs = kc.policies.LayerInputs(None, 1, None, keys, keys + 1, torch.ones(1, LENGTH, dtype=torch.bool))
    kept_keys, kept_values, selection = press.compress_layer(inputs, {0: session.selections[0]}, range(4))
    assert selection is session.selections[0]
    assert torch.equal(kept_keys, selection.apply(keys, keys)[0]) and torch.equal(kept_values, kept_keys + 1)


def test_contexts_not_longer_than_the_window_pass_through():
    model = make_tiny_model("llama")
    press = kc.make_press("chunkkv", compression_ratio=0.9, window=32, compile=False)
    _, cache, session = run(model, prompt(32), press)
    assert all(layer.keys.shape[-2] == 32 for layer in cache.layers)
    _, cache, _ = run(model, prompt(33), press)
    assert all(layer.keys.shape[-2] == 32 for layer in cache.layers)  # window kept whole: 32 >= int(33 * 0.1)


def test_hooks_are_removed_on_exit_even_after_an_exception():
    model = make_tiny_model("llama")
    press = kc.make_press("chunkkv", compression_ratio=0.5, compile=False)
    modules = [m for _, m in kc.find_attention_layers(model)]
    with pytest.raises(RuntimeError, match="boom"):
        with press(model):
            assert all(len(m._forward_hooks) == 1 for m in modules)
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in modules)
    assert not model._forward_pre_hooks and not model._forward_hooks
    # The model is usable again, uncompressed.
    _, cache, _ = run(model, prompt())
    assert cache.layers[0].keys.shape[-2] == LENGTH
    with press(model):
        pass


def test_entering_a_press_twice_on_one_model_is_refused():
    model = make_tiny_model("llama")
    press = kc.make_press("chunkkv", compression_ratio=0.5, compile=False)
    with press(model):
        with pytest.raises(kc.PressAlreadyActiveError, match="already applied"):
            with kc.make_press("knorm", compression_ratio=0.5)(model):
                pass
    other = make_tiny_model("qwen2")
    with press(model), press(other):  # one press, two models: fine
        pass


def test_model_without_attention_layers_is_named_in_the_error():
    with pytest.raises(kc.UnsupportedModelError, match="Sequential"):
        with kc.make_press("chunkkv", compression_ratio=0.5)(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass


def test_right_padding_is_refused_with_advice():
    model = make_tiny_model("llama")
    ids = prompt(50, batch=2)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with pytest.raises(ValueError, match="left padding"):
        run(model, ids, kc.make_press("chunkkv", compression_ratio=0.5, compile=False), attention_mask=mask)


@pytest.mark.slow
def test_compiled_press_on_a_model_equals_eager():
    model = make_tiny_model("llama")
    ids = prompt(300)
    _, eager_cache, _ = run(model, ids, kc.make_press("chunkkv", compression_ratio=0.75, compile=False))
    _, compiled_cache, _ = run(model, ids, kc.make_press("chunkkv", compression_ratio=0.75, compile=True))
    for a, b in zip(eager_cache.layers, compiled_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

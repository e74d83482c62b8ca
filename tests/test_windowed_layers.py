"""Sliding-window layers are recognised from the *model*, whatever cache the caller hands over.

A ``DynamicCache()`` built without ``config=`` (or ``cache_implementation="dynamic_full"`` on
transformers < 5.3) keeps every layer full-length and says ``is_sliding=False``, while the model
still masks its sliding layers to their window. Compressing such a layer and routing it through
a view replaced the window mask by full attention: a keep-all press changed the logits by
0.14-0.31 with no error (found 2026-12-04 on Gemma 2/3, Mistral and Qwen2)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_chunk as kc
from kvpress_chunk.hf.hooks import cache_keyword, find_attention_layers, windowed_layers
from tiny_models import make_auto_tiny_model, make_tiny_model

CASES = {
    "gemma3": ({}, {0, 2}),  # sliding, full, sliding, full
    "gemma2": ({}, {0, 2}),
    "mistral": ({"sliding_window": 32}, {0, 1, 2, 3}),  # no layer_types: every layer slides
    "qwen2": ({"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 2}, {2, 3}),
    "llama": ({}, set()),
}


@pytest.mark.parametrize("family", list(CASES))
def test_windowed_layers_come_from_the_model(family):
    overrides, expected = CASES[family]
    model = make_tiny_model(family, **overrides)
    assert windowed_layers(model, find_attention_layers(model)) == expected


def test_a_module_flag_says_which_layers_slide():
    """Exaone 4 gives every attention module ``sliding_window`` but slides only where
    ``is_sliding``: its full layers were taken for windowed ones, so nothing was compressed."""
    model = make_auto_tiny_model("exaone4", num_hidden_layers=4, sliding_window=32)
    assert model.config.layer_types[3] == "full_attention"
    assert windowed_layers(model, find_attention_layers(model)) == {0, 1, 2}
    generator = torch.Generator().manual_seed(0)
    context, question = torch.randint(3, 120, (1, 100), generator=generator), torch.randint(3, 120, (1, 5), generator=generator)
    follow_up = dict(position_ids=torch.arange(100, 105)[None], attention_mask=torch.ones(1, 105, dtype=torch.long))
    cache = DynamicCache(config=model.config)
    with kc.make_press("chunkkv", compression_ratio=0.0, compile=False)(model) as session, torch.no_grad():
        model(context, **{cache_keyword(model): cache})
        logits = model(question, **{cache_keyword(model): cache}, **follow_up).logits
        plain = model(torch.cat([context, question], dim=-1)).logits[:, -5:]
    assert set(session.selections) == {3}
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=0)  # keeping everything: the model's answer


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "mistral"])
@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_a_cache_built_without_config_leaves_windowed_layers_alone(family, ratio):
    overrides, windowed = CASES[family]
    model = make_tiny_model(family, **overrides)
    generator = torch.Generator().manual_seed(1)
    context, question = torch.randint(3, 120, (1, 100), generator=generator), torch.randint(3, 120, (1, 5), generator=generator)
    follow_up = dict(position_ids=torch.arange(100, 105)[None], attention_mask=torch.ones(1, 105, dtype=torch.long))

    def answer(cache_factory, ratio):
        cache = cache_factory()
        press = kc.make_press("chunkkv", compression_ratio=ratio, compile=False)
        with press(model) as session, torch.no_grad():
            model(context, **{cache_keyword(model): cache})
            logits = model(question, **{cache_keyword(model): cache}, **follow_up).logits
        return logits, set(session.selections)

    with_config, compressed = answer(lambda: DynamicCache(config=model.config), ratio)
    without_config, compressed_too = answer(DynamicCache, ratio)
    assert compressed == compressed_too == {0, 1, 2, 3} - windowed
    torch.testing.assert_close(without_config, with_config, atol=1e-5, rtol=0)
    if ratio == 0.0:  # keeping everything must give the model's own answer
        with torch.no_grad():
            plain = model(torch.cat([context, question], dim=-1)).logits[:, -5:]
        torch.testing.assert_close(without_config, plain, atol=1e-4, rtol=0)


def test_a_full_length_cache_is_refused_where_masks_would_be_sized_from_a_compressed_layer():
    """Qwen2 with sliding layers after full ones: with no sliding layer in the cache, transformers
    sizes the sliding masks from layer 0, which the press compresses: refused, with the fix."""
    overrides, _ = CASES["qwen2"]
    model = make_tiny_model("qwen2", **overrides)
    context = torch.randint(3, 120, (1, 100), generator=torch.Generator().manual_seed(1))
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False)
    with press(model), torch.no_grad(), pytest.raises(ValueError, match=r"DynamicCache\(config=model.config\)"):
        model(context, **{cache_keyword(model): DynamicCache()})
    with press(model) as session, torch.no_grad():  # the cache transformers builds itself is fine
        model(context, **{cache_keyword(model): DynamicCache(config=model.config)})
    assert set(session.selections) == {0, 1}


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("ratio", [0.0, 0.6])
def test_generate_from_a_cache_built_without_config_equals_one_built_with_it(family, ratio):
    """transformers >= 5.14 sized the decoding mask of a compressed full-attention layer from the
    cache's first layer, a full-length sliding layer when the cache has no config: a shape
    error on Gemma 2 (33 keys vs a mask of 76), while the routed path never saw the mismatch."""
    model = make_tiny_model(family)
    ids = torch.randint(3, 120, (1, 75), generator=torch.Generator().manual_seed(2))
    press = kc.make_press("chunkkv", compression_ratio=ratio, compile=False)

    def logits(cache):
        with press(model), torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits, 1)

    torch.testing.assert_close(logits(DynamicCache()), logits(DynamicCache(config=model.config)), atol=1e-5, rtol=0)

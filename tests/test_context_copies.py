"""Copies, loaded files and later press blocks continue a compressed cache like the original.

A compressed cache's views (how later queries see its slots) and its continuation state (what
text it stands for) once lived in tables keyed by the original cache object. A copy
(``CompressedContext.copy``), a context loaded from a file, or the same cache in a later
``with press(model):`` block was therefore continued with plain attention over padding and hidden
slots, or handed to ``model.generate`` without the refusal the original gets: wrong answers, no
error (found 2026-12-04). Both now travel with the cache object, and a context continued after
decoding-time compression routes through the views the cache has *now*, not a prefill snapshot.
"""

from __future__ import annotations

import pytest
import torch

import kvpress_chunk as kc
from kvpress_chunk.generation import CompressedContext, greedy_continue, prefill, teacher_forced_logits
from kvpress_chunk.hf.hooks import cache_keyword
from kvpress_chunk.session import ContinuationError
from tiny_models import left_padded, make_tiny_model

SETTINGS = [("mask", (100,)), ("evict", (120, 70)), ("mask", (120, 70))]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def question(batch: int, length: int = 4) -> torch.Tensor:
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(9))


def manual_forward(model, context: CompressedContext, ids: torch.Tensor) -> torch.Tensor:
    """A correct hand-written continuation: positions after the text, the whole text's 2-D mask."""
    batch, added = ids.shape
    mask = torch.cat([context.attention_mask, torch.ones(batch, added, dtype=context.attention_mask.dtype)], dim=-1)
    positions = context.next_positions[:, None] + torch.arange(added)
    return model(ids, attention_mask=mask, position_ids=positions, **{cache_keyword(model): context.cache}).logits


@pytest.mark.parametrize("apply, lengths", SETTINGS)
def test_a_copy_and_a_later_block_are_routed_like_the_original(model, apply, lengths):
    ids, mask, _ = left_padded(list(lengths), seed=3)
    asked = question(len(lengths))
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False, apply=apply)
    with press(model), torch.no_grad():
        context = prefill(model, ids, mask)
        right = teacher_forced_logits(model, context.copy(), asked)
        copied = manual_forward(model, context.copy(), asked)
    torch.testing.assert_close(copied, right, atol=1e-5, rtol=0)
    with press(model), torch.no_grad():  # the same context in a later block
        later = manual_forward(model, context.copy(), asked)
    torch.testing.assert_close(later, right, atol=1e-5, rtol=0)


def test_generate_refuses_a_copied_or_loaded_compressed_cache(model, tmp_path):
    ids, asked = torch.randint(3, 120, (1, 100), generator=torch.Generator().manual_seed(1)), question(1)
    prompt = torch.cat([ids, asked], dim=-1)
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False)
    path = tmp_path / "context.safetensors"
    with press(model), torch.no_grad():
        context = prefill(model, ids)
        context.save(path, model, press)
        for cache in (context.copy().cache, CompressedContext.load(path, model).cache):
            with pytest.raises(ContinuationError, match="does not continue the compressed cache"):
                model.generate(prompt, **{cache_keyword(model): cache}, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_a_loaded_padded_context_is_refused_outside_the_press(model, tmp_path):
    ids, mask, _ = left_padded([120, 70], seed=3)
    asked = question(2)
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False)
    path = tmp_path / "padded.safetensors"
    with press(model), torch.no_grad():
        prefill(model, ids, mask).save(path, model, press)
    loaded = CompressedContext.load(path, model)
    with torch.no_grad(), pytest.raises(ContinuationError, match="outside the press"):
        manual_forward(model, loaded, asked)  # plain attention would read padding and evicted slots
    with torch.no_grad():  # the library's own loop routes it and answers
        assert greedy_continue(model, CompressedContext.load(path, model), asked, 2).shape == (2, 2)


@pytest.mark.parametrize("apply, lengths", [("evict", (120, 70)), ("mask", (100,))])
def test_after_decoding_time_compression_the_context_routes_through_the_current_views(model, apply, lengths, tmp_path):
    ids, mask, _ = left_padded(list(lengths), seed=3)
    batch = len(lengths)
    asked, step = question(batch, 3), torch.full((batch, 1), 7)
    press = kc.make_press("chunkkv", compression_ratio=0.5, compile=False, apply=apply,
                          decoding={"every": 4, "max_cache": 40})

    def decoded():
        context = prefill(model, ids, mask)
        greedy_continue(model, context, step, 20)  # compresses again while decoding
        return context

    with press(model), torch.no_grad():
        inside = teacher_forced_logits(model, decoded(), asked)
        context = decoded()
    for view_idx, view in context.layer_views.items():  # the views follow the cache
        assert view.prefix_length <= context.cache.layers[view_idx].keys.shape[-2]
    context.save(tmp_path / "decoded.safetensors", model, press)
    with torch.no_grad():
        after = teacher_forced_logits(model, context.copy(), asked)
        loaded = teacher_forced_logits(model, CompressedContext.load(tmp_path / "decoded.safetensors", model), asked)
    torch.testing.assert_close(after, inside, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded, inside, atol=1e-5, rtol=0)


def test_another_models_press_block_does_not_unguard_a_compressed_cache(model):
    """Growing a padded compressed cache outside its own press is refused even while *another*
    model is inside a press block (the guard once asked "is any router installed?")."""
    other = make_tiny_model("llama", seed=1)
    ids, mask, _ = left_padded([120, 70], seed=3)
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False)
    with press(model), torch.no_grad():
        context = prefill(model, ids, mask)
    with press(other), torch.no_grad(), pytest.raises(ContinuationError, match="outside the press"):
        manual_forward(model, context.copy(), question(2))
    with press(other), torch.no_grad():  # the library's own loop still routes it there
        assert greedy_continue(model, context.copy(), question(2), 2).shape == (2, 2)


@pytest.mark.parametrize("protect_prompt", [True, False])
def test_decoding_time_compression_state_follows_its_cache(model, protect_prompt, tmp_path):
    """A context continued after another was prefilled in the same block, in a later block, or
    after a save and load decodes as if continued right after its own prefill (the observation
    window and the protected prompt width were once the session's last prefill's, and
    ``protect_prompt`` was silently dropped for a context not prefilled in the block)."""
    document = torch.randint(3, 120, (1, 120), generator=torch.Generator().manual_seed(1))
    other = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(7))
    asked = question(1)
    press = kc.make_press("chunkkv(window=8)", compression_ratio=0.5, compile=False,
                          decoding={"every": 4, "max_cache": 16, "protect_prompt": protect_prompt})
    with press(model), torch.no_grad():
        context = prefill(model, document)
        context.save(tmp_path / "document.safetensors", model, press)
        alone = greedy_continue(model, context.copy(), asked, 30)
        prefill(model, other)  # another document in between
        after_other = greedy_continue(model, context.copy(), asked, 30)
    with press(model), torch.no_grad():
        later_block = greedy_continue(model, context.copy(), asked, 30)
        loaded = greedy_continue(model, CompressedContext.load(tmp_path / "document.safetensors", model), asked, 30)
    assert torch.equal(after_other, alone)
    assert torch.equal(later_block, alone)
    assert torch.equal(loaded, alone)


def test_a_cache_emptied_and_prefilled_again_forgets_its_earlier_compression(model):
    """What a cache stood for travels with it, so a cache emptied (``crop``) and prefilled again
    must start afresh: its earlier padded prefill's refusal once outlived it."""
    from kvpress_chunk.generation import new_cache

    keyword = cache_keyword(model)
    ids, mask, _ = left_padded([120, 70], seed=3)
    cache = new_cache(model)
    with kc.make_press("chunkkv", compression_ratio=0.75, compile=False)(model), torch.no_grad():
        model(ids, attention_mask=mask, **{keyword: cache})
    cache.crop(-cache.get_seq_length())
    rows = torch.randint(3, 120, (2, 50), generator=torch.Generator().manual_seed(4))
    step = dict(input_ids=torch.tensor([[5], [6]]), position_ids=torch.tensor([[50], [50]]))
    with kc.make_press("chunkkv", compression_ratio=0.0, compile=False)(model), torch.no_grad():
        model(rows, **{keyword: cache})  # keep-all, unpadded: plain attention continues it right
    fresh = new_cache(model)
    with torch.no_grad():
        model(rows, **{keyword: fresh})
        want = model(**step, **{keyword: fresh}).logits
        got = model(**step, **{keyword: cache}).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

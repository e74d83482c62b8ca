"""Decoding-time compression in mask mode (issue 12): tokens stay in memory, masks hide them back
to M visible per row with the press's own parts; greedy tokens and logits equal evict mode's."""

from __future__ import annotations

import pytest
import torch

import kvpress_chunk as kc
from kvpress_chunk.generation import forward_after, greedy_continue, prefill
from kvpress_chunk.modes.routing import router_of
from tiny_models import left_padded, make_tiny_model

_MODELS = {}


def tiny(family="llama"):
    if family not in _MODELS:
        model = make_tiny_model(family, num_layers=3 if family == "llama" else 4)
        model.generation_config.eos_token_id = None
        _MODELS[family] = model
    return _MODELS[family]


def press_for(preset, apply, every, extra, protect=False):
    base = kc.make_press(preset, compression_ratio=0.5)
    max_cache = base.selector.protected_count(base.scorer.window) + extra
    return kc.make_press(preset, compression_ratio=0.5, compile=False, apply=apply,
                         decoding={"every": every, "max_cache": max_cache, "protect_prompt": protect})


def greedy_logits(model, press, ids, mask, steps):
    """Greedy tokens ``[B, steps]`` and the logits that chose them ``[B, steps, V]``, our loop."""
    tokens, logits = [], []
    with press(model) as session:
        context = prefill(model, ids, mask)
        last, attention, positions = context.last_logits, context.attention_mask, context.next_positions
        for _ in range(steps):
            token = last.argmax(dim=-1)
            tokens.append(token)
            logits.append(last.float())
            out, attention, positions = forward_after(model, context.cache, attention, positions, token[:, None], 1)
            last = out.logits[:, -1]
        return torch.stack(tokens, 1), torch.stack(logits, 1), session.decoder.compressions, context


@pytest.mark.parametrize("preset, every, extra, protect", [
    ("chunkkv", 8, 8, False),        # shared selection, chunks
    ("snapkv", 5, 3, False),         # per-head selection
    ("streamingllm", 4, 20, True),   # sinks + recent, prompt protected
    ("pyramidkv", 6, 10, False),     # per-layer budgets capped at M, per head
    ("chunkkv-expected", 6, 10, False),  # statistics over the last `every` generated tokens
])
def test_mask_mode_decodes_like_evict_mode_on_a_padded_batch(preset, every, extra, protect):
    model = tiny()
    ids, mask, _ = left_padded([70, 33, 52], seed=len(preset))
    steps = 60
    ev_tokens, ev_logits, ev_passes, _ = greedy_logits(model, press_for(preset, "evict", every, extra, protect), ids, mask, steps)
    mk_tokens, mk_logits, mk_passes, context = greedy_logits(model, press_for(preset, "mask", every, extra, protect),
                                                             ids, mask, steps)
    assert ev_passes == mk_passes > 0
    assert torch.equal(ev_tokens, mk_tokens)
    torch.testing.assert_close(mk_logits, ev_logits, atol=1e-4, rtol=1e-4)
    # mask mode keeps every token in memory; the views hide all but M (+ new tokens) per row
    width = ids.shape[1] + steps
    assert all(layer.keys.shape[-2] == width for layer in context.cache.layers)


def test_mask_mode_generate_rows_equal_rows_alone_and_evict_mode():
    model = tiny()
    ids, mask, rows = left_padded([60, 25], seed=1)
    outs = {}
    for apply in ("evict", "mask"):
        press = press_for("chunkkv", apply, 8, 8)
        with press(model) as session:
            batched = model.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=0)
            assert session.decoder.compressions > 0
            batched = batched[:, ids.shape[1]:]
            for r, row in enumerate(rows):
                alone = model.generate(row[None], max_new_tokens=60, do_sample=False, pad_token_id=0)
                assert torch.equal(batched[r], alone[0, row.shape[0]:]), (apply, r)
            context = prefill(model, ids, mask)  # our loop == generate
            first = context.last_logits.argmax(dim=-1, keepdim=True)
            ours = torch.cat([first, greedy_continue(model, context, first, 59)], dim=-1)
            assert torch.equal(ours, batched), apply
        outs[apply] = batched
    assert torch.equal(outs["mask"], outs["evict"])


def test_mask_mode_views_hold_at_most_max_cache_plus_every_visible_tokens():
    model = tiny()
    every, extra = 6, 4
    press = press_for("snapkv", "mask", every, extra)
    ids, mask, _ = left_padded([80, 40], seed=7)
    seen = []

    def visible(cache):
        views = router_of(model).views.get(cache, {})
        counts = [v.visible.sum(dim=-1).amax(dim=1) + (layer.keys.shape[-2] - v.prefix_length)
                  for i, layer in enumerate(cache.layers) if (v := views.get(i)) is not None]
        return torch.stack(counts).amax(dim=0).tolist()

    with press(model) as session:
        context = prefill(model, ids, mask)
        handle = model.register_forward_hook(lambda *a: seen.append(visible(context.cache)))
        try:
            greedy_continue(model, context, ids[:, -1:], 80)
        finally:
            handle.remove()
        assert session.decoder.compressions > 0
    bound = press.decoding.max_cache + every
    assert max(max(c) for c in seen) <= bound
    assert session.decoder.max_seen <= bound


def test_mask_mode_on_a_sliding_window_model_equals_evict_mode():
    model = tiny("gemma3")  # sliding layers are left alone, full layers compressed while decoding
    ids, mask, _ = left_padded([70, 40], seed=3)
    a = greedy_logits(model, press_for("chunkkv", "evict", 8, 8), ids, mask, 50)
    b = greedy_logits(model, press_for("chunkkv", "mask", 8, 8), ids, mask, 50)
    assert a[2] == b[2] > 0 and torch.equal(a[0], b[0])
    torch.testing.assert_close(b[1], a[1], atol=1e-4, rtol=1e-4)


def test_a_mask_mode_context_continued_by_an_evict_decoding_press_is_refused_clearly():
    """Evict mode's decoding compression reads the cache as left-padded rows; a mask-mode
    context's view hides slots in the middle (an IndexError deep in the selector before)."""
    model = make_tiny_model("llama")
    ids, mask, _ = left_padded([120, 75], seed=5)
    masked = kc.make_press("chunkkv", compression_ratio=0.6, compile=False, apply="mask",
                           decoding={"every": 4, "max_cache": 40})
    with masked(model), torch.no_grad():
        context = prefill(model, ids, mask)
        greedy_continue(model, context, torch.full((2, 1), 7), 7)
    with masked.replace(apply="evict")(model), torch.no_grad():
        with pytest.raises(ValueError, match="compressed in mask mode"):
            greedy_continue(model, context.copy(), torch.full((2, 1), 9), 20)

"""One decoding step with a 75%-compressed cache: full cache vs evict vs mask (FlexAttention).

Run: ``pytest benchmarks --benchmark-only``. SmolLM2's attention shape on random weights
(30 layers would only multiply the same ratio; 4 layers keep the run short). Ratios to the full
cache are what to read: pytest-benchmark prints them in the group's ``Mean (ratio)`` column.
Before timing, mask and evict must give the same next-token logits.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvpress_chunk as kc


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=1536, num_hidden_layers=4, max_position_embeddings=16_384)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("length", [2048, 8192])
@pytest.mark.parametrize("mode", ["full", "evict", "mask"])
def test_decode_step(benchmark, model, length, mode):
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(length))
    step = torch.tensor([[7]])
    position = torch.tensor([[length]])
    reference_logits = None
    if mode == "mask":  # the evict-mode answer, to check mask mode against before timing it
        reference = DynamicCache(config=model.config)
        with torch.no_grad(), kc.make_press("chunkkv", compression_ratio=0.75, compile=False)(model):
            model(ids, past_key_values=reference)
            reference_logits = model(step, past_key_values=reference, position_ids=position).logits
    press = None if mode == "full" else kc.make_press("chunkkv", compression_ratio=0.75, apply=mode, compile=False)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), (press(model) if press else contextlib.nullcontext()):
        model(ids, past_key_values=cache)
        kept = cache.get_seq_length()

        def one_step():
            out = model(step, past_key_values=cache, position_ids=position).logits
            cache.crop(kept)  # back to the compressed prefix: every round times the same step
            return out

        logits = one_step()
        if reference_logits is not None:
            torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)
        benchmark.group = f"decode step, {length} cached tokens, 75% compressed"
        benchmark(one_step)

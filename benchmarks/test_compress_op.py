"""Per-layer compression op (score -> group -> select -> gather): kvpress-chunk vs kvpress.

Run: ``pytest benchmarks --benchmark-only``. Every case first checks that both libraries return
the same compressed keys, then times them on identical inputs (SmolLM2's layer shape: 9 query /
3 KV heads, head_dim 64; batch 1, because kvpress only handles batch row 0).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpress_chunk as kc
from kvpress_chunk.policies import LayerInputs

kvpress = pytest.importorskip("kvpress")


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=64, num_hidden_layers=1, max_position_embeddings=40_000)
    model = LlamaForCausalLM(config).eval()
    return model


def make_inputs(model, length):
    generator = torch.Generator().manual_seed(length)
    hidden = torch.randn(1, length, 576, generator=generator)
    keys = torch.randn(1, 3, length, 64, generator=generator)
    values = torch.randn(1, 3, length, 64, generator=generator)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(length)[None])
    return hidden, keys, values, cos_sin


@pytest.mark.parametrize("length", [2048, 8192])
@pytest.mark.parametrize("impl", ["kvpress", "ours-eager", "ours-compiled"])
def test_chunkkv_layer_op(benchmark, layer, length, impl):
    module = layer.model.layers[0].self_attn
    hidden, keys, values, cos_sin = make_inputs(layer, length)
    reference = kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=0.75), chunk_length=20)
    want, _ = reference.compress(module, hidden, keys, values, None, {"position_embeddings": cos_sin})
    if impl == "kvpress":
        fn = lambda: reference.compress(module, hidden, keys, values, None, {"position_embeddings": cos_sin})  # noqa: E731
    else:
        press = kc.make_press("chunkkv-kvpress", compression_ratio=0.75, compile=impl == "ours-compiled")
        inputs = LayerInputs(module, 0, hidden, keys, values, torch.ones(1, length, dtype=torch.bool), cos_sin)
        fn = lambda: press.select(inputs)  # noqa: E731
    with torch.no_grad():
        got = fn()[0]
        assert torch.equal(got, want)
        benchmark.group = f"chunkkv layer op, {length} tokens"
        benchmark(fn)

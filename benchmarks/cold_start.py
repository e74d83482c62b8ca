"""First compiled calls of a fresh process, for ``test_cold_start.py`` (run as a script).

    python benchmarks/cold_start.py [compiled|eager]

Prints one JSON line: seconds spent importing, in the first call of the fused compression op
(``chunkkv``, SmolLM2's layer shape, 1024 tokens) and in the first mask-mode decoding step
(compiled FlexAttention over a 1024-token compressed prefix); each includes its compilation
when ``compiled``. Where compiled artefacts are cached is the caller's business
(``TORCHINDUCTOR_CACHE_DIR``; see :mod:`kvpress_chunk.compile.cache`).
"""

from __future__ import annotations

import json
import sys
import time

start = time.perf_counter()
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvpress_chunk as kc  # noqa: E402
from kvpress_chunk.modes.block_masks import PrefixBlocks  # noqa: E402
from kvpress_chunk.modes.flex import flex_decode_step  # noqa: E402
from kvpress_chunk.policies import LayerInputs  # noqa: E402

LENGTH = 1024


def main(mode: str) -> dict:
    imported = time.perf_counter() - start
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=64, num_hidden_layers=1, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    hidden = torch.randn(1, LENGTH, 576)
    keys, values = torch.randn(1, 3, LENGTH, 64), torch.randn(1, 3, LENGTH, 64)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(LENGTH)[None])
    inputs = LayerInputs(model.model.layers[0].self_attn, 0, hidden, keys, values,
                         torch.ones(1, LENGTH, dtype=torch.bool), cos_sin)
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=mode == "compiled")
    with torch.inference_mode():
        t = time.perf_counter()
        press.select(inputs)
        op = time.perf_counter() - t
        flex = 0.0
        if mode == "compiled":
            kept = torch.rand(1, 1, LENGTH) < 0.25
            query = torch.randn(1, 9, 1, 64)
            grown_k, grown_v = torch.randn(1, 3, LENGTH + 1, 64), torch.randn(1, 3, LENGTH + 1, 64)
            t = time.perf_counter()
            out = flex_decode_step(query, grown_k, grown_v, PrefixBlocks(kept, 9, 16), 0.125)
            flex = time.perf_counter() - t
            assert out is not None, "compiled flex is unavailable on this machine"
    return {"import": imported, "op": op, "flex": flex}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "compiled")))

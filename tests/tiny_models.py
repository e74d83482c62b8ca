"""Tiny randomly initialised causal LMs of several HF families, built in code (no downloads).

All share the shape that matters for compression: 4 query heads over 2 KV heads (GQA),
head_dim 16, RoPE. Gemma 2/3 alternate sliding-window and full-attention layers, so the tests
also see a hybrid cache (sliding layers are left alone by design).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),  # has q_norm / k_norm
    # Mistral's default sliding_window (4096) would make every cache layer a sliding layer.
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": 32}),  # sliding/full alternate
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": 32}),
}
TINY_FAMILIES = tuple(_FAMILIES)


def make_tiny_model(family: str, *, seed: int = 0, num_layers: int = 4, dtype=torch.float32, **overrides):
    """An eval-mode ``*ForCausalLM`` with deterministic random weights (``overrides``: config keys)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(TINY_FAMILIES)}")
    config_cls, model_cls, extra = _FAMILIES[family]
    extra = dict(extra)
    if family == "gemma3":
        extra["layer_types"] = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2)
    extra.update(overrides)
    settings = dict(
        vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, num_hidden_layers=num_layers, max_position_embeddings=4096,
    )
    config = config_cls(**{**settings, **extra})
    torch.manual_seed(seed)
    return model_cls(config).to(dtype).eval()


def make_auto_tiny_model(model_type: str, **config):
    """A tiny random model of a family :func:`make_tiny_model` does not build, from its
    ``model_type`` (the test is skipped if this transformers release lacks the family)."""
    import pytest

    settings = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, num_hidden_layers=2, max_position_embeddings=4096, pad_token_id=0)
    try:
        built = AutoConfig.for_model(model_type, **{**settings, **config})
    except (KeyError, ValueError) as exc:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type} ({type(exc).__name__})")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(built, attn_implementation="eager").eval()


def left_padded(lengths, seed=0):
    """A left-padded batch of random rows: ``(ids[B, W], mask[B, W], rows)``, ``rows`` unpadded."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = []
    for r, n in enumerate(lengths):
        row = torch.randint(3, 128, (n,), generator=g)
        ids[r, width - n:], mask[r, width - n:] = row, 1
        rows.append(row)
    return ids, mask, rows


class ByteTokenizer:
    """A real (if trivial) tokenizer for the tiny models: one id per byte, modulo their vocab."""

    chat_template = None
    eos_token_id = None  # answers run to max_new_tokens

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(128)}

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(int(i) % 128 for i in ids).decode("ascii")

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [b % 128 for b in text.encode()]

        class Encoded:
            input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids

        return Encoded()

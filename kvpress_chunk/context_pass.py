"""The context pass: an extra forward of the model after the prefill, for scorers that need one.

Why: a query-agnostic press only sees the end of the document through its observation window,
which is what loses needles in the middle. KVzip (:mod:`.policies.kvzip`) instead asks the model
to reconstruct the whole context from the cache and keeps what that reconstruction attends to.
That needs the *model* to run again, which a scorer alone cannot do, so the session runs the pass
here, after the prefill's forward and before any layer is evicted::

    prefill forward (layers deferred) -> run_context_pass -> scores per layer -> select -> evict

The pass appends the reconstruction tokens to the live cache; every cache layer's state is put
back exactly as it was afterwards (the layers replace their tensors on update rather than writing
into them, so restoring the references is exact and free). It runs through the base model (no LM
head) under ``torch.inference_mode``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .hf.hooks import cache_keyword, call_argument
from .modes.routing import PASS_ATTENTION


def load_tokenizer_for(model: nn.Module) -> Any:
    """The tokenizer saved with ``model`` (its ``name_or_path`` folder), or ``None``; local files only."""
    path = getattr(getattr(model, "config", None), "name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not found"; the caller explains what to do
        return None


@torch.inference_mode()
def run_context_pass(
    model: nn.Module,
    scorer: Any,
    tokenizer: Any,
    cache: Any,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    layers: Sequence[tuple[int, nn.Module]],
) -> dict[int, torch.Tensor]:
    """Run ``scorer``'s extra pass over the prefilled ``cache``; ``layer_idx -> float32[B, Hkv, T]``
    for each of ``layers`` (``(layer_idx, attention module)``). The cache is left as it was."""
    length = valid.shape[-1]
    scores: dict[int, torch.Tensor] = {}
    chunk_in_flight: list = []

    fused_this_chunk: set[int] = set()

    def add(layer_idx: int, contribution: torch.Tensor) -> None:
        previous = scores.get(layer_idx)
        scores[layer_idx] = contribution if previous is None else torch.maximum(previous, contribution)

    def make_override(layer_idx: int):
        # The scorer may compute the layer's attention itself and its scores with it (KVzip on
        # CPU: the normalisers come free with the attention); None lets the model's run.
        def override(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict):
            result = scorer.pass_attention(query, key, value, kwargs, valid, chunk_in_flight[0])
            if result is None:
                return None
            output, contribution = result
            if contribution is not None:  # else the forward hook scores the layer after it
                add(layer_idx, contribution)
                fused_this_chunk.add(layer_idx)
            return output

        return override

    def make_hook(layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if layer_idx in fused_this_chunk:
                return
            layer = cache.layers[layer_idx]
            hidden = call_argument(args, kwargs, "hidden_states", 0)
            contribution = scorer.pass_scores(
                module, hidden, kwargs.get("position_embeddings"), layer.keys, layer.values, valid, chunk_in_flight[0]
            )
            add(layer_idx, contribution)

        return hook

    base = getattr(model, "base_model", model)
    saved = [dict(layer.__dict__) for layer in cache.layers]
    handles = [module.register_forward_hook(make_hook(idx), with_kwargs=True) for idx, module in layers]
    if getattr(scorer, "pass_attention", None) is not None:
        for idx, module in layers:
            PASS_ATTENTION[module] = make_override(idx)
    try:
        max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        for chunk in scorer.pass_chunks(tokenizer, input_ids, valid, max_positions=max_positions):
            chunk_in_flight[:] = [chunk]
            fused_this_chunk.clear()
            mask = torch.cat([valid, chunk.valid], dim=-1).to(torch.long)
            base(
                input_ids=chunk.input_ids,
                attention_mask=mask,
                position_ids=chunk.positions,
                use_cache=True,
                **{cache_keyword(base): cache},
            )
            for layer, state in zip(cache.layers, saved):
                layer.__dict__.clear()
                layer.__dict__.update(state)
    finally:
        for handle in handles:
            handle.remove()
        for _, module in layers:
            PASS_ATTENTION.pop(module, None)
        for layer, state in zip(cache.layers, saved):
            layer.__dict__.clear()
            layer.__dict__.update(state)
    for layer_idx, value in scores.items():
        if value.shape[-1] != length:
            raise RuntimeError(f"context pass scored {value.shape[-1]} tokens of layer {layer_idx}, expected {length}")
    return scores

"""The context pass: an extra forward of the model after the prefill, for scorers that need one.

Why: a query-agnostic press only sees the end of the document through its observation window,
which is what loses needles in the middle. KVzip (:mod:`.policies.kvzip`) instead asks the model
to reconstruct the whole context from the cache and keeps what that reconstruction attends to.
That needs the *model* to run again, which a scorer alone cannot do, so the session runs the pass
here, after the prefill's forward and before any layer is evicted::

    prefill forward (layers deferred) -> run_context_pass -> scores per layer -> select -> evict

The pass appends the reconstruction tokens to the live cache; every cache layer's state is put
back exactly as it was afterwards (attention layers replace their key/value tensors on update, so
those are restored by reference for free; any other state, such as the convolution and recurrent
states of hybrid models, which are written in place, is restored from a copy: :func:`layer_state`).
It runs through the base model (no LM head) under ``torch.inference_mode``.
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


#: cache layer attributes that layers replace (never write into) when they grow: kept by reference
REPLACED_TENSORS = ("keys", "values")


def copy_state(value: Any) -> Any:
    """A copy of ``value`` that the pass cannot change: tensors cloned, dicts and lists copied
    (:func:`layer_state` keeps the :data:`REPLACED_TENSORS` out of it: restored by reference, free)."""
    if isinstance(value, torch.Tensor):
        # of the same kind: the pass runs in inference mode, and a clone made there of a normal
        # tensor is an inference tensor, which `generate` (no_grad) may not update in place
        with torch.inference_mode(value.is_inference()):
            return value.clone()
    if isinstance(value, dict):
        return {key: copy_state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_state(item) for item in value)
    return value


def layer_state(attributes: dict) -> dict:
    """What restoring a cache layer with these ``attributes`` (its ``__dict__``) needs: the
    :data:`REPLACED_TENSORS` by reference, a copy of the rest. Why not the attribute references
    alone: the linear-attention and convolution layers of hybrid models (LFM2, Qwen3-Next, Jamba
    on transformers >= 5.2x) write their states in place (``conv_states[i] = ...`` in a dict they
    keep, ``cumulative_length_linear.add_``), so the references came back holding the
    reconstruction prompt's states: later tokens decoded from the wrong recurrent state, no error."""
    return {name: value if name in REPLACED_TENSORS else copy_state(value) for name, value in attributes.items()}


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
    saved = [layer_state(layer.__dict__) for layer in cache.layers]
    handles = [module.register_forward_hook(make_hook(idx), with_kwargs=True) for idx, module in layers]
    if getattr(scorer, "pass_attention", None) is not None:
        for idx, module in layers:
            PASS_ATTENTION[module] = make_override(idx)
    try:
        max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        for chunk in scorer.pass_chunks(tokenizer, input_ids, valid, max_positions=max_positions):
            if chunk.input_ids.shape[-1] == 0:
                continue  # no row has anything to reconstruct (only the chat prefix): no forward
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
                layer.__dict__.update(layer_state(state))  # a copy: the next chunk mutates it again
    finally:
        for handle in handles:
            handle.remove()
        for _, module in layers:
            PASS_ATTENTION.pop(module, None)
        for layer, state in zip(cache.layers, saved):
            layer.__dict__.clear()
            layer.__dict__.update(state)
    for layer_idx, _ in layers:
        if layer_idx not in scores:
            # Nothing was reconstructed (a context that is only the chat template's prefix): no
            # query scored the layer, as for such a row beside others in a batch. A forward of
            # 0 tokens raised deep inside the model instead (generate_answers(context="")).
            keys = cache.layers[layer_idx].keys
            scores[layer_idx] = torch.zeros(keys.shape[0], keys.shape[1], length, device=keys.device)
    for layer_idx, value in scores.items():
        if value.shape[-1] != length:
            raise RuntimeError(f"context pass scored {value.shape[-1]} tokens of layer {layer_idx}, expected {length}")
    return scores

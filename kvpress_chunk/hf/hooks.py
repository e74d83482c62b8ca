"""Transformers glue: find attention layers, read what their forward received, reach the cache.

Kept apart from the policies so that those stay pure tensor code; everything that knows about
HF class layouts and argument names lives here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """The model has no attention layers this library can hook."""


def find_attention_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """Attention modules in layer order: modules with a ``layer_idx`` and a key projection.

    Matching on structure rather than on class names keeps any Llama-like HF model working
    (Llama, Qwen2/3, Mistral, Gemma 1-3, Phi-3...) without a list to maintain.

    Only the text decoder is searched (``model.get_decoder()``): a multimodal model's vision or
    audio encoder may have attention modules of the same shape and layer numbers (Gemma 4's
    vision tower, built before its language model, took text layers 0 and 1: those were never
    compressed, and a shape error followed). Two modules claiming one layer are refused.
    """
    found: dict[int, nn.Module] = {}
    for module in _decoder(model).modules():
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int) or not type(module).__name__.endswith("Attention"):
            continue
        if not (hasattr(module, "k_proj") or hasattr(module, "qkv_proj")):
            continue
        if layer_idx < 0:
            # Zamba 2 builds one attention block with layer_idx=-1 and runs it at several depths:
            # "layer -1" read the *last* cache layer (a raw IndexError or TypeError further on).
            raise UnsupportedModelError(
                f"{type(module).__name__} has layer_idx {layer_idx}: one attention block shared by several layers "
                f"of {type(model).__name__}, whose cache layers a press cannot tell apart; not supported"
            )
        if found.setdefault(layer_idx, module) is not module:
            raise UnsupportedModelError(
                f"{type(found[layer_idx]).__name__} and {type(module).__name__} both claim attention layer {layer_idx} "
                f"of {type(model).__name__}: a press cannot tell which one the cache layer belongs to"
            )
    if not found:
        raise UnsupportedModelError(
            f"cannot find attention layers in {type(model).__name__}: expected modules named '*Attention' "
            "with an integer `layer_idx` and a `k_proj`/`qkv_proj` projection (HF Llama-like layout)"
        )
    return sorted(found.items())


def _decoder(model: nn.Module) -> nn.Module:
    """The text decoder of ``model`` (its language model in a multimodal model), else ``model``."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:  # noqa: BLE001 - a model without a decoder to name: search all of it
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else model


#: ``config.layer_types`` entries whose attention sees only a bounded span of the past
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def windowed_layers(model: nn.Module, layers: list[tuple[int, nn.Module]]) -> set[int]:
    """Indices of the attention layers that see only a window of the past, *as the model
    computes them* (not as the cache is built).

    Why from the model: a user may hand over a ``DynamicCache()`` built without ``config=``
    (or, on transformers < 5.3, ask ``generate`` for ``cache_implementation="dynamic_full"``),
    whose layers are all full-length and say ``is_sliding=False`` while the model still masks
    those layers to their window. Compressing such a layer and routing it through a view would
    replace the model's window mask by full attention: wrong logits, no error. Sources, any of
    which marks a layer: ``config.layer_types`` (Gemma 2/3, Qwen2/3, Cohere2...), a config
    ``sliding_window`` with no ``layer_types`` (Mistral: every layer slides, unless
    ``use_sliding_window`` is False), or the attention module itself (:func:`module_slides`)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layer_types = list(getattr(config, "layer_types", None) or [])
    everywhere = (
        not layer_types
        and getattr(config, "sliding_window", None) is not None
        and getattr(config, "use_sliding_window", True) is not False
    )
    windowed = set()
    for idx, module in layers:
        by_type = idx < len(layer_types) and layer_types[idx] in WINDOWED_LAYER_TYPES
        by_module = module_slides(module)
        if by_type or everywhere or by_module:
            windowed.add(idx)
    return windowed


def module_slides(module: nn.Module) -> bool:
    """Whether an attention module masks to a window of the past by its own attributes.

    A module's ``is_sliding`` flag, where it has one, decides: Exaone 4 gives *every* layer
    ``sliding_window`` and passes it to attention only where ``is_sliding`` (its full layers
    were all taken for windowed ones: nothing was compressed, with a false warning). Otherwise
    a ``sliding_window`` or ``attention_chunk_size`` that is set marks the layer."""
    flag = getattr(module, "is_sliding", None)
    if isinstance(flag, bool):
        return flag
    return getattr(module, "sliding_window", None) is not None or getattr(module, "attention_chunk_size", None) is not None


def call_argument(args: tuple, kwargs: dict[str, Any], name: str, position: int) -> Any:
    """An argument of a forward call, whether passed by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


#: How transformers names the cache argument: ``cache`` from 5.2x (``past_key_values`` is
#: deprecated there, removal planned for 5.40), ``past_key_values`` before, ``past_key_value``
#: in older attention layers. Every spelling is looked up, newest first.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values", "past_key_value")


class CacheNotFoundError(UnsupportedModelError):
    """An attention layer that should be compressed was called without a recognisable cache argument."""


def cache_argument(args: tuple, kwargs: dict[str, Any], position: int | None = None) -> Any:
    """The cache object of a forward call under any of its names (``None`` if absent or None)."""
    for name in CACHE_ARGUMENT_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    if position is not None and len(args) > position and hasattr(args[position], "get_seq_length"):
        return args[position]
    return None


def has_cache_argument(kwargs: dict[str, Any]) -> bool:
    """Whether the call names a cache argument at all (its value may be ``None``: use_cache=False)."""
    return any(name in kwargs for name in CACHE_ARGUMENT_NAMES)


def takes_argument(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` declares a parameter ``name`` (argument names move between
    transformers releases: ``cache`` / ``past_key_values``, ``cache_position``)."""
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes the cache on this transformers version."""
    return "cache" if takes_argument(model, "cache") else "past_key_values"


def cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length())


#: Cache layer classes (and their subclasses) whose tensors cannot be replaced by a shorter
#: gathered copy: static layers are preallocated to ``max_cache_len`` and written in place by
#: ``cache_position`` (their length never shows the prefill, so nothing would be compressed);
#: quantized layers keep most tokens in a packed form next to a residual ``keys`` tensor.
UNEVICTABLE_LAYERS = ("StaticLayer", "BaseQuantizedLayer", "QuantizedLayer")


def unevictable_layer(cache: Any, layer_indices: "list[int] | None" = None) -> str | None:
    """The class name of the first of ``cache``'s layers (among ``layer_indices``) that a press
    cannot evict in place, or ``None``."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    indices = range(len(layers)) if layer_indices is None else [i for i in layer_indices if i < len(layers)]
    for idx in indices:
        names = {cls.__name__ for cls in type(layers[idx]).__mro__}
        if names.intersection(UNEVICTABLE_LAYERS):
            return type(layers[idx]).__name__
    return None


#: attributes of attention layers whose value heads are not their key heads: DiffLlama splits
#: the values in two halves and repeats each across the KV heads (differential attention)
REMIXED_VALUE_HEADS = ("lambda_init",)


def remixed_value_heads(layers: list[tuple[int, nn.Module]]) -> str | None:
    """The class name of the first attention layer whose value head ``h`` carries another KV
    head's values, or ``None``. Per-head eviction keeps other tokens in each head's slots, so
    such a layer would pair one head's keys with another head's values (wrong, no error)."""
    for _, module in layers:
        if any(hasattr(module, name) for name in REMIXED_VALUE_HEADS):
            return type(module).__name__
    return None


def query_projection(module: nn.Module) -> nn.Module | None:
    """The submodule of an attention layer whose output holds its queries (``q_proj``, or the
    fused ``qkv_proj`` of Phi-3, queries first), or ``None`` when the layer has neither."""
    for name in ("q_proj", "qkv_proj"):
        projection = getattr(module, name, None)
        if isinstance(projection, nn.Module):
            return projection
    return None


def padding_mask(attention_mask: Any, length: int) -> torch.Tensor | None:
    """``valid[B, T]`` from a 2-D HF attention mask; ``None`` when nothing is padded.

    Only left padding is supported (HF's convention for generation): a row must be padding
    first, then real tokens. Anything else is refused loudly rather than silently mis-selected.
    """
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    if attention_mask.shape[-1] != length:
        return None
    valid = attention_mask.bool()
    if bool(valid.all()):
        return None
    empty = (~valid.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        # Such a row has nothing to score, keep or continue from: its budget, positions and views
        # would be defined on zero tokens (model.generate failed a step later with a misleading
        # positions mismatch). Refused before the forward runs.
        raise ValueError(
            f"row(s) {empty} of this batch are all padding (attention_mask all zeros): a press compresses each "
            "row's own tokens, so every row needs at least one real token. Drop the empty row(s) from the batch"
        )
    if valid.shape[-1] > 1 and bool((valid[:, 1:].int() < valid[:, :-1].int()).any()):
        raise ValueError(
            "the press supports left padding only (real tokens at the end of each row); "
            "set tokenizer.padding_side = 'left'"
        )
    return valid

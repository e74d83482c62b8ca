"""Save a :class:`~kvpress_chunk.generation.CompressedContext` to one ``.safetensors`` file and
load it back in another process: compress a long document once, ask about it many times.

What is stored (everything decoding reads, nothing executable: tensors plus a string header)::

    context.attention_mask   int [B, L]     2-D mask of the original text so far
    context.next_positions   int64 [B]      RoPE position of each row's next token
    context.last_logits      float [B, V]   logits after the last token
    cache.{i}.keys           [B, H, T_i, D] layer i's cached keys (T_i < L when compressed)
    cache.{i}.values         [B, H, T_i, D]
    view.{i}.visible         bool [B, Hs, P_i]  LayerView of compressed layer i
    decoding.{i}.hidden      [B, w, H]      decoding-time compression's observation window
    decoding.{i}.cos / .sin  [B, w, d]      (only for a press with ``decoding``, see below)

plus header metadata (strings; JSON where structured): ``format``, ``format_version``,
``layers`` (type and length bookkeeping of every cache layer: ``cumulative_length`` and
``sliding_window`` of sliding-window layers), ``views`` (``flex_block_size``, ``all_visible``),
``decoding`` (optional: each layer's protected prompt width and the tokens generated since the
last compression, so a loaded context decodes under a ``decoding`` press exactly as the original),
``model_config`` / ``model_fingerprint`` (the config keys that shape the cache),
``weights_fingerprint`` (a sample of every parameter), ``weights_fingerprint_lines`` (the first
row and column of every parameter), ``dtype``, ``batch_size``,
``text_length``, ``kept_tokens``, ``press`` / ``press_spec``, versions, ``created``, the
caller's ``meta``, and ``digest``: a BLAKE2b over the header and every tensor (name, dtype,
shape, bytes), so a truncated, bit-flipped or edited file is refused rather than decoded into
silently wrong answers. (The digest detects corruption, it is no signature: whoever can write
the file can recompute it. Loading is safe regardless: safetensors holds data only.)

:func:`load_context` rebuilds a ``DynamicCache`` for the model with
:func:`~kvpress_chunk.generation.new_cache` and refills each layer through the layer's own
``lazy_initialization`` (its attributes differ between transformers versions), then restores the
keys/values and the sliding layers' ``cumulative_length``. Decoding from the loaded context is
token-for-token that of the original.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .hf.growing_layer import GrowingDynamicLayer, grow_in_place

FORMAT = "kvpress_chunk.compressed_context"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: Config keys that decide the cache's layout or its keys, or how the model reads them (a
#: different value means a different model). ``rope_parameters`` (theta, scaling, partial rotary
#: factor): the cached keys are rotated with them, so the same weights under another RoPE setting
#: continued a loaded context with queries rotated otherwise (other tokens after 4 steps, no
#: error). The second group is the same story for the residual stream and the attention: the same
#: weights with another norm epsilon, activation, query scale or soft cap computed other keys at
#: prefill than the loading model computes for the new tokens (and other ``last_logits``), and
#: the weights fingerprint cannot tell. Only keys the config has are recorded, and a file is
#: compared on the keys both it and the model hold (files written before a key was added, a
#: transformers release that adds or drops an attribute).
FINGERPRINT_KEYS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
    "vocab_size", "layer_types", "sliding_window", "rope_parameters",
    # what the cached keys/values are (the residual stream that feeds them) and how they are read
    "rms_norm_eps", "layer_norm_eps", "norm_eps", "hidden_act", "hidden_activation", "attention_bias", "mlp_bias",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "use_sliding_window",
    "max_window_layers", "sliding_window_pattern", "partial_rotary_factor", "rope_theta", "max_position_embeddings",
    "attention_multiplier", "embedding_multiplier", "residual_multiplier", "logits_scaling", "no_rope_layers",
    "no_rope_layer_interval", "use_qk_norm", "attention_chunk_size", "num_kv_shared_layers", "tie_word_embeddings",
    "use_bidirectional_attention",
)

#: Cache layer classes this format knows how to restore (transformers 5.x names).
FULL_LAYER, SLIDING_LAYER = "DynamicLayer", "DynamicSlidingWindowLayer"

_CONTEXT_TENSORS = ("context.attention_mask", "context.next_positions", "context.last_logits")


class SavedContextError(ValueError):
    """A saved context cannot be written or loaded (corrupt, truncated, wrong model, unknown version...)."""


@dataclass(frozen=True)
class SavedContextInfo:
    """The header of a saved context (read without loading or verifying the tensors)."""

    path: Path
    format_version: int
    meta: dict[str, Any]
    press: str
    model_config: dict[str, Any]
    dtype: str
    batch_size: int
    text_length: int
    kept_tokens: list[int]
    layers: list[dict[str, Any]]
    versions: dict[str, str]
    created: str
    raw: dict[str, str] = field(repr=False)


# -- fingerprints ------------------------------------------------------------------------------------


def model_config_summary(model: nn.Module) -> dict[str, Any]:
    """The config keys of :data:`FINGERPRINT_KEYS` the config has (text config of multimodal models)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    summary: dict[str, Any] = {}
    for key in FINGERPRINT_KEYS:
        if not hasattr(config, key):
            continue
        value = getattr(config, key)
        if isinstance(value, tuple):
            value = list(value)
        summary[key] = value
    return json.loads(json.dumps(summary, sort_keys=True, default=str))  # as the header stores it (nested values too)


def model_fingerprint(model: nn.Module) -> str:
    return _hash_json(model_config_summary(model))


def _parameters_digest(model: nn.Module, lines_of) -> str:
    """Hash of every parameter's name and shape and of the float32 values of ``lines_of(parameter)``
    (a list of tensors); what the two weights fingerprints share."""
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}:{tuple(parameter.shape)};".encode())
            if parameter.device.type == "meta" or parameter.numel() == 0:
                continue
            for line in lines_of(parameter.detach()):
                digest.update(line.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module, sample: int = 8) -> str:
    """Hash of every parameter's name, shape and first ``sample`` values (as float32): tells two
    models of the same architecture apart (another seed or fine-tune) in milliseconds."""
    return _parameters_digest(model, lambda parameter: [parameter.reshape(-1)[:sample]])


def _first_row_and_column(parameter: torch.Tensor) -> list[torch.Tensor]:
    if parameter.dim() < 2:
        return [parameter.reshape(-1)]
    flat = parameter.reshape(-1, parameter.shape[-1])
    return [flat[0], flat[:, 0]]


def weights_fingerprint_lines(model: nn.Module) -> str:
    """Hash of every parameter's name, shape, first row and first column (as ``[-1, last dim]``;
    1-D parameters whole), as float32. What :func:`weights_fingerprint` misses: an edit of some
    rows only (a fine-tune of some token embeddings, pruned heads): a context saved from such a
    model loaded silently into the other and answered with other tokens. Costs one strided read
    per matrix (rows + columns values), a few milliseconds on SmolLM2-135M."""
    return _parameters_digest(model, _first_row_and_column)


def _hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def _content_digest(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """BLAKE2b of the header (minus the digest itself) and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=32)
    header = {key: value for key, value in metadata.items() if key != "digest"}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"\n{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


# -- save ----------------------------------------------------------------------------------------------


def _layer_record(index: int, layer: Any) -> dict[str, Any]:
    kind = getattr(type(layer), "saved_kind", type(layer).__name__)  # a growing layer is saved as a DynamicLayer
    if kind not in (FULL_LAYER, SLIDING_LAYER):
        raise SavedContextError(
            f"cannot save cache layer {index} of type {kind}: only {FULL_LAYER} and {SLIDING_LAYER} "
            "(a transformers DynamicCache) are supported"
        )
    keys = getattr(layer, "keys", None)
    initialized = bool(getattr(layer, "is_initialized", False)) and isinstance(keys, torch.Tensor) and keys.dim() == 4
    record: dict[str, Any] = {"type": kind, "initialized": initialized}
    if isinstance(layer, GrowingDynamicLayer):
        record["grows_in_place"] = True  # a compressed layer: it grows the same way once loaded
    if kind == SLIDING_LAYER:
        record["sliding_window"] = int(layer.sliding_window)
        record["cumulative_length"] = int(layer.cumulative_length)
        record["record_past"] = bool(getattr(layer, "record_past", False))
    return record


def _export(tensor: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """A CPU, contiguous tensor that owns its storage (safetensors refuses shared storage)."""
    out = tensor.detach().to("cpu").contiguous()
    storage = out.untyped_storage()
    if storage.data_ptr() in seen or storage.nbytes() != out.numel() * out.element_size():
        out = out.clone()
        storage = out.untyped_storage()
    seen.add(storage.data_ptr())
    return out


def save_context(context: Any, path: str | os.PathLike, model: nn.Module, press: Any = None, **meta: Any) -> Path:
    """Write ``context`` (from :func:`~kvpress_chunk.generation.prefill`) to one ``.safetensors``
    file; returns its path. ``model`` is the model that built it (its config and a sample of its
    weights are fingerprinted, so loading into another model fails loudly); ``press`` is recorded
    (``press.describe()``) for information. ``meta``: JSON-serialisable values kept in the header
    (read them back with :func:`context_info`). The file is written atomically."""
    from .generation import CompressedContext

    if not isinstance(context, CompressedContext):
        raise TypeError(f"save_context needs a CompressedContext, got {type(context).__name__}")
    path = Path(path)
    if context.module_masks:
        # The masks are the other library's state on the model, read by its attention patch: a
        # file cannot carry them, and the loaded context attended to every key it had masked
        # (kvpress' AdaKV at 0.7 on tiny Llama: the full cache's answer, 24 of 80 tokens "kept").
        raise SavedContextError(
            f"cannot save this context: another library's press (kvpress' AdaKV, ExpectedAttention under AdaKV or "
            f"KVzip) masks its keys on the model's attention modules (layers {sorted(context.module_masks)}) instead "
            "of evicting them, and a file cannot carry those masks: loaded, it would attend to every key. Save a "
            "context compressed by a press that evicts (ours, or kvpress' SnapKV, ...)"
        )
    cache = context.cache
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise SavedContextError(
            f"cannot save a {type(cache).__name__}: expected a transformers DynamicCache with a list of layers"
        )
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"save_context meta values must be JSON-serialisable: {exc}") from None

    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {
        "context.attention_mask": _export(context.attention_mask, seen),
        "context.next_positions": _export(context.next_positions, seen),
        "context.last_logits": _export(context.last_logits, seen),
    }
    records = []
    dtype = None
    for index, layer in enumerate(layers):
        record = _layer_record(index, layer)
        records.append(record)
        if record["initialized"]:
            tensors[f"cache.{index}.keys"] = _export(layer.keys, seen)
            tensors[f"cache.{index}.values"] = _export(layer.values, seen)
            dtype = dtype or layer.keys.dtype
    views = {}
    for index, view in sorted(context.layer_views.items()):
        if not 0 <= index < len(layers) or not records[index]["initialized"]:
            raise SavedContextError(f"the context has a view for layer {index}, which its cache does not hold")
        slots = layers[index].keys.shape[-2]
        if view.prefix_length > slots:
            raise SavedContextError(
                f"the view of layer {index} covers {view.prefix_length} slots, its cache layer holds {slots}: the "
                "context's views are stale (the cache was compressed again after they were taken)"
            )
        tensors[f"view.{index}.visible"] = _export(view.visible.to(torch.bool), seen)
        views[str(index)] = {"flex_block_size": view.flex_block_size, "all_visible": bool(view.all_visible)}

    decoding = _export_decoding(cache, tensors, seen)

    import transformers

    from . import __version__

    to_spec = getattr(press, "to_spec", None)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(model_config_summary(model), sort_keys=True),
        "model_fingerprint": model_fingerprint(model),
        "weights_fingerprint": weights_fingerprint(model),
        "weights_fingerprint_lines": weights_fingerprint_lines(model),
        "dtype": str(dtype or model.dtype).removeprefix("torch."),
        "batch_size": str(context.attention_mask.shape[0]),
        "text_length": str(context.attention_mask.shape[-1]),
        "kept_tokens": json.dumps([int(k) for k in context.kept_per_row().tolist()]),
        "num_layers": str(len(layers)),
        "layers": json.dumps(records),
        "views": json.dumps(views, sort_keys=True),
        **({"decoding": json.dumps(decoding, sort_keys=True)} if decoding else {}),
        "press": press.describe() if press is not None else "",
        "press_spec": json.dumps(to_spec(), sort_keys=True, default=str) if callable(to_spec) else "",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "kvpress_chunk_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "meta": meta_json,
    }
    metadata["digest"] = _content_digest(metadata, tensors)

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _export_decoding(cache: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> dict | None:
    """Decoding-time compression state of ``cache`` (:class:`~kvpress_chunk.decoding.CacheDecoding`)
    into ``tensors``; its header entry, or None when the cache has none."""
    from .decoding import DECODING_ATTR

    state = getattr(cache, "__dict__", {}).get(DECODING_ATTR)
    if state is None:
        return None
    layers = {}
    for index, hidden in sorted(state.hidden.items()):
        tensors[f"decoding.{index}.hidden"] = _export(hidden, seen)
        tensors[f"decoding.{index}.valid"] = _export(state.hidden_valid[index], seen)  # recorded with hidden
        rope = state.rope.get(index)
        if rope is not None:
            tensors[f"decoding.{index}.cos"], tensors[f"decoding.{index}.sin"] = _export(rope[0], seen), _export(rope[1], seen)
        # "valid": files written before 2026-12-07 have no decoding.{i}.valid (loaded as all real)
        layers[str(index)] = {"rope": rope is not None, "prompt_width": state.prompt_width.get(index), "valid": True}
    since = state.since.tolist() if isinstance(state.since, torch.Tensor) else int(state.since)
    return {"layers": layers, "since": since}


def _restore_decoding(path: Path, spec: Any, tensors: Mapping[str, torch.Tensor], cache: Any, batch: int) -> None:
    from .decoding import decoding_state

    _expect(path, isinstance(spec, dict) and isinstance(spec.get("layers"), dict), "the 'decoding' header entry is malformed")
    state = decoding_state(cache, fresh=True)
    for key, record in spec["layers"].items():
        index = int(key)
        device = cache.layers[index].keys.device if getattr(cache.layers[index], "keys", None) is not None else "cpu"
        hidden = tensors[f"decoding.{index}.hidden"]
        _expect(path, hidden.dim() == 3 and hidden.shape[0] == batch, f"decoding.{index}.hidden is {tuple(hidden.shape)}, not [B={batch}, w, H]")
        state.hidden[index] = hidden.to(device)
        valid = tensors[f"decoding.{index}.valid"] if record.get("valid") else None  # older files: all real
        _expect(path, valid is None or tuple(valid.shape) == tuple(hidden.shape[:2]),
                f"decoding.{index}.valid does not match decoding.{index}.hidden")
        state.hidden_valid[index] = (valid.to(device).bool() if valid is not None
                                     else torch.ones(hidden.shape[:2], dtype=torch.bool, device=device))
        if record.get("rope"):
            state.rope[index] = (tensors[f"decoding.{index}.cos"].to(device), tensors[f"decoding.{index}.sin"].to(device))
        if isinstance(record.get("prompt_width"), int):
            state.prompt_width[index] = record["prompt_width"]
    since = spec.get("since", 0)
    state.since = torch.tensor(since, dtype=torch.int64) if isinstance(since, list) else int(since)


# -- load ----------------------------------------------------------------------------------------------


def _open(path: Path):
    """``safe_open`` handle, or a :class:`SavedContextError` saying what is wrong with the file."""
    from safetensors import safe_open

    if not path.is_file():
        raise SavedContextError(f"saved context {str(path)!r} does not exist")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own (Rust) error types
        raise SavedContextError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from None


def _header(path: Path, handle) -> dict[str, str]:
    metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise SavedContextError(
            f"{str(path)!r} is a safetensors file but not a saved kvpress_chunk context (no format={FORMAT!r} "
            "in its metadata)"
        )
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) not in SUPPORTED_VERSIONS:
        raise SavedContextError(
            f"{str(path)!r} has format version {version!r}; this kvpress_chunk reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} (written by kvpress_chunk "
            f"{metadata.get('kvpress_chunk_version', '?')})"
        )
    return metadata


def _field(path: Path, metadata: Mapping[str, str], key: str, kind: str = "json") -> Any:
    if key not in metadata:
        raise SavedContextError(f"{str(path)!r}: the header has no {key!r} entry (corrupted or not written by save_context)")
    try:
        return int(metadata[key]) if kind == "int" else json.loads(metadata[key]) if kind == "json" else metadata[key]
    except ValueError:
        raise SavedContextError(f"{str(path)!r}: the header entry {key!r} is malformed: {metadata[key][:80]!r}") from None


def context_info(path: str | os.PathLike) -> SavedContextInfo:
    """The header of a saved context (format checked; tensors neither read nor verified)."""
    path = Path(path)
    metadata = _header(path, _open(path))
    return _info(path, metadata)


def _info(path: Path, metadata: Mapping[str, str]) -> SavedContextInfo:
    return SavedContextInfo(
        path=path,
        format_version=_field(path, metadata, "format_version", "int"),
        meta=_field(path, metadata, "meta"),
        press=_field(path, metadata, "press", "str"),
        model_config=_field(path, metadata, "model_config"),
        dtype=_field(path, metadata, "dtype", "str"),
        batch_size=_field(path, metadata, "batch_size", "int"),
        text_length=_field(path, metadata, "text_length", "int"),
        kept_tokens=_field(path, metadata, "kept_tokens"),
        layers=_field(path, metadata, "layers"),
        versions={key.removesuffix("_version"): metadata.get(key, "?")
                  for key in ("transformers_version", "torch_version", "kvpress_chunk_version")},
        created=metadata.get("created", "?"),
        raw=dict(metadata),
    )


def _check_model(path: Path, info: SavedContextInfo, metadata: Mapping[str, str], model: nn.Module,
                 check_weights: bool = True) -> None:
    current = model_config_summary(model)
    recorded = info.model_config if isinstance(info.model_config, dict) else {}
    # Compared on the keys both hold (older files lack the newer keys; files written before
    # absent keys were left out hold them as None).
    differing = [key for key in sorted(recorded) if key in current and recorded[key] != current[key]]
    if not isinstance(info.model_config, dict) or differing:
        differences = ", ".join(f"{key} {recorded.get(key)!r} (file) vs {current.get(key)!r} (model)" for key in differing)
        raise SavedContextError(f"{str(path)!r} was saved for a different model: {differences or 'unreadable config'}")
    model_dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    if model_dtype and model_dtype != info.dtype:
        raise SavedContextError(
            f"{str(path)!r} holds {info.dtype} keys/values but the model runs in {model_dtype}: load the model "
            f"with dtype=torch.{info.dtype}"
        )
    # Files written before the first row and column were fingerprinted are checked on the sample.
    lines = metadata.get("weights_fingerprint_lines")
    if check_weights and (metadata.get("weights_fingerprint") != weights_fingerprint(model)
                          or (lines is not None and lines != weights_fingerprint_lines(model))):
        raise SavedContextError(
            f"{str(path)!r} was saved for a model of the same architecture ({current.get('model_type')}) but "
            "different weights: load it with the model that compressed it"
        )


def _expect(path: Path, condition: bool, message: str) -> None:
    if not condition:
        raise SavedContextError(f"{str(path)!r}: {message}")


def _layer_devices(model: nn.Module, count: int) -> list[torch.device]:
    """Device of each layer's attention module (models split across devices), else the model's."""
    from .hf.hooks import find_attention_layers

    default = getattr(model, "device", torch.device("cpu"))
    devices = [default] * count
    try:
        layers = find_attention_layers(model)
    except Exception:
        return devices
    for index, module in layers:
        parameter = next(module.parameters(), None)
        if 0 <= index < count and parameter is not None and parameter.device.type != "meta":
            devices[index] = parameter.device
    return devices


def load_context(path: str | os.PathLike, model: nn.Module, check_weights: bool = True) -> Any:
    """Load a context written by :func:`save_context` for ``model`` (the model that wrote it).

    Raises :class:`SavedContextError` naming the file and the problem when the file is missing,
    truncated or corrupted, of an unknown format version, written for another model (config,
    weights or dtype), or inconsistent (missing tensors, wrong shapes). ``check_weights=False``
    skips the weights fingerprint (the config must still match).
    """
    from .generation import CompressedContext, new_cache
    from .modes.routing import LayerView

    path = Path(path)
    handle = _open(path)
    metadata = _header(path, handle)
    info = _info(path, metadata)
    views_meta = _field(path, metadata, "views")
    num_layers = _field(path, metadata, "num_layers", "int")
    _expect(path, isinstance(info.layers, list) and len(info.layers) == num_layers,
            f"the header lists {len(info.layers) if isinstance(info.layers, list) else '?'} layers, expected {num_layers}")
    _expect(path, isinstance(views_meta, dict), "the 'views' header entry is malformed")

    expected = set(_CONTEXT_TENSORS)
    for index, record in enumerate(info.layers):
        _expect(path, isinstance(record, dict) and record.get("type") in (FULL_LAYER, SLIDING_LAYER),
                f"layer {index} has an unknown type {record.get('type') if isinstance(record, dict) else record!r}")
        if record.get("initialized"):
            expected |= {f"cache.{index}.keys", f"cache.{index}.values"}
    expected |= {f"view.{index}.visible" for index in views_meta}
    decoding_meta = _field(path, metadata, "decoding") if "decoding" in metadata else None
    if decoding_meta is not None:
        _expect(path, isinstance(decoding_meta, dict) and isinstance(decoding_meta.get("layers"), dict)
                and all(key.isdigit() and int(key) < num_layers for key in decoding_meta["layers"]),
                "the 'decoding' header entry is malformed")
        for key, record in decoding_meta["layers"].items():
            expected.add(f"decoding.{key}.hidden")
            if isinstance(record, dict) and record.get("rope"):
                expected |= {f"decoding.{key}.cos", f"decoding.{key}.sin"}
            if isinstance(record, dict) and record.get("valid"):
                expected.add(f"decoding.{key}.valid")
    present = set(handle.keys())
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    _expect(path, not missing, f"tensor(s) missing: {', '.join(missing)} (truncated or edited file)")
    _expect(path, not unexpected, f"unexpected tensor(s): {', '.join(unexpected)} (edited file)")
    try:
        tensors = {name: handle.get_tensor(name) for name in sorted(expected)}
    except Exception as exc:
        raise SavedContextError(f"{str(path)!r}: cannot read the tensors (truncated or corrupted?): {exc}") from None
    _expect(path, metadata.get("digest") == _content_digest(metadata, tensors),
            "checksum mismatch: the file was corrupted or edited after it was written")

    _check_model(path, info, metadata, model, check_weights)

    # -- shapes -------------------------------------------------------------------------------------
    mask, positions, logits = (tensors[name] for name in _CONTEXT_TENSORS)
    _expect(path, mask.dim() == 2 and not mask.is_floating_point(), f"attention_mask must be an integer [B, L] tensor, got {mask.dtype} {tuple(mask.shape)}")
    batch, length = mask.shape
    _expect(path, batch == info.batch_size and length == info.text_length,
            f"attention_mask is {tuple(mask.shape)}, the header says batch {info.batch_size}, length {info.text_length}")
    _expect(path, positions.shape == (batch,) and positions.dtype == torch.int64,
            f"next_positions must be int64 [{batch}], got {positions.dtype} {tuple(positions.shape)}")
    _expect(path, logits.dim() == 2 and logits.shape[0] == batch and logits.is_floating_point(),
            f"last_logits must be a float [{batch}, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    _expect(path, bool((positions >= 0).all()) and bool((positions <= length).all()),
            f"next_positions {positions.tolist()} lie outside the text (length {length})")

    from .session import mark_prefilled

    cache = new_cache(model)
    mark_prefilled(cache)  # a saved context's cache continues like the prefilled one it was
    layers = getattr(cache, "layers", None)
    _expect(path, isinstance(layers, list) and len(layers) == num_layers,
            f"the file has {num_layers} cache layers, a fresh cache for this model has "
            f"{len(layers) if isinstance(layers, list) else '?'}")
    devices = _layer_devices(model, num_layers)
    for index, (record, layer) in enumerate(zip(info.layers, layers)):
        kind = type(layer).__name__
        _expect(path, kind == record["type"], f"layer {index} is a {record['type']} in the file, a {kind} in this model's cache")
        if kind == SLIDING_LAYER:
            _expect(path, record.get("sliding_window") == layer.sliding_window,
                    f"layer {index}: sliding window {record.get('sliding_window')} in the file, {layer.sliding_window} in the model")
        if not record.get("initialized"):
            continue
        keys, values = tensors[f"cache.{index}.keys"], tensors[f"cache.{index}.values"]
        _expect(path, keys.dim() == 4 and keys.shape[:3] == values.shape[:3] and keys.shape[0] == batch,
                f"layer {index}: keys {tuple(keys.shape)} / values {tuple(values.shape)} are not [B={batch}, H, T, D] pairs")
        _expect(path, str(keys.dtype).removeprefix("torch.") == info.dtype and values.dtype == keys.dtype,
                f"layer {index}: keys/values are {keys.dtype}/{values.dtype}, the header says {info.dtype}")
        slots = keys.shape[2]
        if kind == SLIDING_LAYER:
            cumulative = record.get("cumulative_length")
            _expect(path, isinstance(cumulative, int) and slots <= cumulative <= length,
                    f"layer {index}: cumulative_length {cumulative!r} is inconsistent with {slots} slots and text length {length}")
        else:
            _expect(path, slots <= length, f"layer {index}: {slots} slots for a text of {length} tokens")
        device = devices[index]
        keys, values = keys.to(device), values.to(device)
        layer.lazy_initialization(keys, values)  # sets dtype/device/... as this transformers version wants
        layer.keys, layer.values = keys, values
        if kind == SLIDING_LAYER:
            layer.cumulative_length = int(record["cumulative_length"])
            if hasattr(layer, "record_past"):
                layer.record_past = bool(record.get("record_past", False))
        if record.get("grows_in_place"):
            grow_in_place(layer)

    views = {}
    for key, spec in views_meta.items():
        _expect(path, key.isdigit() and int(key) < num_layers and info.layers[int(key)].get("initialized"),
                f"a view for layer {key!r}, which the cache does not hold")
        index = int(key)
        visible = tensors[f"view.{index}.visible"]
        layer_keys = layers[index].keys
        _expect(path, visible.dtype == torch.bool and visible.dim() == 3 and visible.shape[0] == batch
                and visible.shape[1] in (1, layer_keys.shape[1]) and visible.shape[2] <= layer_keys.shape[2],
                f"view of layer {index}: visible {visible.dtype} {tuple(visible.shape)} does not fit keys {tuple(layer_keys.shape)}")
        block = spec.get("flex_block_size") if isinstance(spec, dict) else "?"
        _expect(path, block is None or (isinstance(block, int) and block > 0), f"view of layer {index}: bad flex_block_size {block!r}")
        views[index] = LayerView(visible.to(layer_keys.device), block, bool(spec.get("all_visible", False)))

    from .modes.routing import attach_views
    from .session import record_compressed, views_hide_slots

    device = getattr(model, "device", torch.device("cpu"))
    positions, mask = positions.to(device), mask.to(device)
    # Routed, checked and guarded like the cache it was saved from: a loaded cache continued
    # outside the press, or handed to model.generate, was once neither refused nor warned about.
    attach_views(cache, views)
    if decoding_meta is not None:
        _restore_decoding(path, decoding_meta, tensors, cache, batch)
    if views:
        record_compressed(cache, length, positions, list(views), padded=not bool(mask.bool().all()),
                          hidden=views_hide_slots(views))
    return CompressedContext(cache, positions, mask, logits.to(device), views, _measured_kept(path, info, views, positions))


def _measured_kept(path: Path, info: SavedContextInfo, views: Mapping[int, Any], positions: torch.Tensor) -> torch.Tensor | None:
    """The kept tokens a context without views reported when saved (a cache another library
    compressed: :attr:`CompressedContext.measured_kept`), or ``None`` when they are its text's.
    Why: without them a loaded kvpress SnapKV context of 36 slots per layer reported all 120
    tokens kept. A context with views reports from its views."""
    if views:
        return None
    kept = info.kept_tokens
    _expect(path, isinstance(kept, list) and len(kept) == positions.shape[0] and all(isinstance(k, int) for k in kept),
            f"the header's kept_tokens {kept!r} do not give one count per row")
    measured = torch.tensor(kept, dtype=torch.int64, device=positions.device)
    return None if bool((measured == positions).all()) else measured

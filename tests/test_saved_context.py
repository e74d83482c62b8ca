"""Saved contexts (compress once, ask many, across processes): ``save_context`` / ``load_context``
round trips exactly, and every damaged or mismatched file is refused with a clear error.

The oracle: decoding from the loaded context equals decoding from the original, token for token
and logit for logit, over presets (both apply modes, per-head budgets), padded batches, and a
model mixing sliding-window and full-attention layers with contexts longer than the window.
"""

from __future__ import annotations

import argparse
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import kvpress_chunk as kc
from kvpress_chunk.generation import CompressedContext, greedy_continue, prefill
from kvpress_chunk.modes.flex import FLEX_STATUS, compiled_graph_count
from kvpress_chunk.modes.routing import VIEWS_ATTR
from kvpress_chunk.session import ContinuationError
from kvpress_chunk.saved_context import (
    FORMAT_VERSION,
    SavedContextError,
    _content_digest,
    context_info,
    load_context,
    save_context,
)
from tiny_models import make_tiny_model

WINDOW = 32
PRESSES = (
    None,
    ("chunkkv", {}),
    ("chunkkv", {"apply": "mask"}),
    ("snapkv", {}),
    ("streamingllm", {}),
    ("chunkkv-adaptive", {"apply": "mask"}),
)
_MODELS: dict = {}


@pytest.fixture(autouse=True)
def _room_for_test_shapes():
    # Mask mode compiles flex per head layout: these tests sweep more shapes than one process meets.
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    # Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    # spin-waiting made each tiny linear ~100x slower (minutes instead of seconds for this file).
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny(family: str, layers: int = 4, seed: int = 0):
    """Shared tiny models (never mutated): llama, and gemma3 (sliding window 32 / full, alternating)."""
    key = (family, layers, seed)
    if key not in _MODELS:
        extra = {"sliding_window": WINDOW} if family == "gemma3" else {}
        _MODELS[key] = make_tiny_model(family, num_layers=layers, seed=seed, **extra)
    return _MODELS[key]


def make_press(entry, ratio=0.75):
    if entry is None:
        return None
    name, settings_ = entry
    return kc.make_press(name, compression_ratio=ratio, compile=False, **settings_)


def left_padded(lengths, seed=0, vocab=120):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, width - n:] = 1
    return ids, mask


def build(family="llama", press_entry=("chunkkv", {}), lengths=(70,), ratio=0.75, seed=0, layers=4):
    model = tiny(family, layers)
    ids, mask = left_padded(lengths, seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no layer was compressed")
        context = prefill(model, ids, mask, make_press(press_entry, ratio))
    return model, context


def decode(model, context, question, steps=5):
    """Greedy tokens and the last-position logits of every forward, through greedy_continue itself."""
    logits = []
    handle = model.register_forward_hook(lambda module, args, out: logits.append(out.logits[:, -1].clone()))
    try:
        tokens = greedy_continue(model, context, question, steps)
    finally:
        handle.remove()
    return tokens, torch.stack(logits)


def assert_same_state(original: CompressedContext, loaded: CompressedContext):
    assert torch.equal(original.attention_mask.cpu(), loaded.attention_mask.cpu())
    assert torch.equal(original.next_positions.cpu(), loaded.next_positions.cpu())
    assert torch.equal(original.last_logits.cpu(), loaded.last_logits.cpu())
    assert len(original.cache.layers) == len(loaded.cache.layers)
    for before, after in zip(original.cache.layers, loaded.cache.layers):
        assert type(before) is type(after)
        assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)
        assert getattr(before, "cumulative_length", None) == getattr(after, "cumulative_length", None)
        assert before.get_seq_length() == after.get_seq_length()
    assert original.layer_views.keys() == loaded.layer_views.keys()
    for index, view in original.layer_views.items():
        other = loaded.layer_views[index]
        assert torch.equal(view.visible, other.visible)
        assert (view.flex_block_size, view.all_visible) == (other.flex_block_size, other.all_visible)


# -- round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("press_entry", PRESSES, ids=lambda entry: "none" if entry is None else
                         entry[0] + ("-mask" if entry[1] else ""))
@settings(max_examples=6, deadline=None)
@given(
    family=st.sampled_from(["llama", "gemma3"]),
    ratio=st.sampled_from([0.5, 0.75]),
    lengths=st.lists(st.integers(WINDOW + 8, 80), min_size=1, max_size=3),
    question_length=st.integers(1, 4),
    fed_before_saving=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_round_trip_decodes_identically(tmp_path_factory, press_entry, family, ratio, lengths, question_length,
                                        fed_before_saving, seed):
    event(f"{family} batch {len(lengths)}")
    model, context = build(family, press_entry, lengths, ratio, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if fed_before_saving:  # a context that already answered something (longer mask, grown caches)
        greedy_continue(model, context, torch.randint(3, 120, (len(lengths), 2), generator=generator), 3)
    path = tmp_path_factory.mktemp("ctx") / "context.safetensors"
    save_context(context, path, model, make_press(press_entry, ratio), note="property")
    loaded = load_context(path, model)
    assert_same_state(context, loaded)

    question = torch.randint(3, 120, (len(lengths), question_length), generator=generator)
    expected_tokens, expected_logits = decode(model, context.copy(), question)
    tokens, logits = decode(model, loaded, question)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("press_entry", [("chunkkv", {"apply": "mask"}), ("chunkkv-adaptive", {"apply": "mask"})],
                         ids=["shared-heads", "per-head"])
def test_round_trip_through_compiled_flex(tmp_path, press_entry, monkeypatch):
    monkeypatch.setenv("KVPRESS_CHUNK_MASK_DECODE", "flex")  # CPU decodes through the gather kernel by default
    model, context = build("gemma3", press_entry, (75, 50))
    assert all(view.flex_block_size for view in context.layer_views.values())
    loaded = load_context(save_context(context, tmp_path / "c.safetensors", model), model)
    question = torch.tensor([[5, 6, 7], [8, 9, 10]])
    before = compiled_graph_count()
    expected_tokens, expected_logits = decode(model, context.copy(), question, steps=4)
    tokens, logits = decode(model, loaded, question, steps=4)
    assert not FLEX_STATUS.broken and compiled_graph_count() >= max(before, 1)  # flex really decoded
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)


def test_methods_and_header(tmp_path):
    model, context = build("gemma3", ("chunkkv-adaptive", {"apply": "mask"}), (80, 50))
    press = make_press(("chunkkv-adaptive", {"apply": "mask"}))
    path = context.save(tmp_path / "sub" / "ctx.safetensors", model, press, question_hint="what?", n=3)
    info = context_info(path)
    assert info.format_version == FORMAT_VERSION
    assert info.meta == {"question_hint": "what?", "n": 3}
    assert info.press == press.describe()
    assert (info.batch_size, info.text_length, info.dtype) == (2, 80, "float32")
    assert info.model_config["model_type"] == model.config.model_type
    # a compressed full layer grows in place (kvpress_chunk/hf/growing_layer.py): stored as the
    # transformers layer it is a subclass of, and grown again once loaded
    assert [(layer["type"], layer.get("grows_in_place", False)) for layer in info.layers] == [
        ("DynamicLayer", True) if type(layer).__name__ == "GrowingDynamicLayer" else (type(layer).__name__, False)
        for layer in context.cache.layers
    ]
    assert any(layer.get("grows_in_place") for layer in info.layers)
    sliding = [layer for layer in info.layers if layer["type"] == "DynamicSlidingWindowLayer"]
    assert sliding and all(layer["cumulative_length"] == 80 for layer in sliding)
    loaded = CompressedContext.load(path, model)
    assert_same_state(context, loaded)
    assert not list(path.parent.glob("*.partial"))  # written atomically, nothing left behind
    with safe_open(str(path), framework="pt") as handle:  # only data: the names this format documents
        names = set(handle.keys())
    assert {"context.attention_mask", "context.next_positions", "context.last_logits"} <= names
    assert all(name.startswith(("context.", "cache.", "view.")) for name in names)


def test_lost_state_is_detected_by_the_oracle(tmp_path):
    """The round-trip oracle has teeth: a context missing its views decodes differently. (A sliding
    layer's cumulative_length changes the masks of transformers < 5.3 only; its exact restore is
    checked field by field in the round-trip tests.)"""
    model, context = build("gemma3", ("chunkkv", {"apply": "mask"}), (80, 60))
    path = save_context(context, tmp_path / "c.safetensors", model)
    question = torch.tensor([[5, 6, 7], [8, 9, 10]])
    _, expected = decode(model, context.copy(), question, steps=3)

    no_views = load_context(path, model)
    no_views.layer_views = {}
    _, logits = decode(model, no_views, question, steps=3)  # the cache still carries its views
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    no_views = load_context(path, model)
    no_views.layer_views = {}
    no_views.cache.__dict__.pop(VIEWS_ATTR)
    with pytest.raises(ContinuationError):  # views lost everywhere: refused, never decoded wrongly
        decode(model, no_views, question, steps=3)

    import transformers

    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 3):
        shifted = load_context(path, model)
        for layer in shifted.cache.layers:
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length -= 20
        _, logits = decode(model, shifted, question, steps=3)
        assert not torch.allclose(logits, expected, atol=1e-4)


def test_file_size_is_the_cache(tmp_path):
    model, context = build("llama", ("chunkkv", {}), (90,), ratio=0.5)
    path = save_context(context, tmp_path / "c.safetensors", model)
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in context.cache.layers)
    extra = context.last_logits.nbytes + context.attention_mask.nbytes + context.next_positions.nbytes
    extra += sum(view.visible.nbytes for view in context.layer_views.values())
    size = path.stat().st_size
    assert cache_bytes + extra <= size <= cache_bytes + extra + 16_384  # + header


# -- damaged files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, context = build("gemma3", ("chunkkv", {}), (70, 50))
    path = save_context(context, tmp_path_factory.mktemp("saved") / "ctx.safetensors", model,
                        make_press(("chunkkv", {})))
    return model, context, path, path.read_bytes()


def header_span(data: bytes) -> tuple[int, int]:
    (length,) = struct.unpack("<Q", data[:8])
    return 8, 8 + length


def rewrite(path: Path, source: Path, edit_tensors=None, edit_metadata=None, resign=False):
    """Copy ``source`` to ``path`` with tensors / metadata edited (``resign``: recompute the digest,
    as a buggy writer would)."""
    with safe_open(str(source), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    if resign:
        metadata["digest"] = _content_digest(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def refused(path, model, *fragments):
    with pytest.raises(SavedContextError) as info:
        load_context(path, model)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("keep", [0, 5, 8, 40, "header", "header+1", "half", "all-1"])
def test_truncated_file(tmp_path, saved, keep):
    model, _, _, data = saved
    start, end = header_span(data)
    cut = {"header": end, "header+1": end + 1, "half": len(data) // 2, "all-1": len(data) - 1}.get(keep, keep)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    refused(path, model)


@settings(max_examples=15, deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipped_header_bytes_are_never_silent(tmp_path_factory, saved, where, mask):
    """Any byte of the header altered: refused, or (a whitespace swap, say) loaded bit-identical."""
    model, context, _, data = saved
    start, end = header_span(data)
    position = start + int(where * (end - start))
    damaged = bytearray(data)
    damaged[position] ^= mask
    path = tmp_path_factory.mktemp("flip") / "ctx.safetensors"
    path.write_bytes(bytes(damaged))
    try:
        loaded = load_context(path, model)
    except SavedContextError as exc:
        assert str(path) in str(exc)
    else:
        assert_same_state(context, loaded)


@pytest.mark.parametrize("needle", [b'"data_offsets":[', b'"format_version":"', b'"press":"', b'"dtype":"F',
                                    b'"shape":[', b'"layers":"', b'"views":"'])
def test_flipped_byte_in_each_header_part(tmp_path, saved, needle):
    model, _, _, data = saved
    start, end = header_span(data)
    position = data.index(needle, start, end) + len(needle)
    damaged = bytearray(data)
    damaged[position] ^= 0x01
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(damaged))
    refused(path, model)


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_flipped_data_bytes(tmp_path, saved, where):
    model, _, _, data = saved
    _, end = header_span(data)
    damaged = bytearray(data)
    damaged[end + int(where * (len(data) - end))] ^= 0x10
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(damaged))
    refused(path, model, "checksum mismatch")


@pytest.mark.parametrize(
    "other, fragment",
    [(("llama", 4, 0), "model_type"), (("gemma3", 2, 0), "num_hidden_layers"), (("gemma3", 4, 1), "different weights")],
    ids=["other-family", "other-layer-count", "same-architecture-other-weights"],
)
def test_wrong_model(saved, other, fragment):
    _, _, path, _ = saved
    refused(path, tiny(*other), fragment)


def test_the_same_weights_under_another_rope_setting_are_refused(tmp_path, saved):
    """The cached keys were rotated with the saving model's RoPE: the same weights loaded with
    another theta continued the context with other tokens after 4 steps, no error."""
    model, _, path, _ = saved
    rope = {kind: {**params, "rope_theta": params["rope_theta"] * 8} for kind, params in model.config.rope_parameters.items()}
    other = make_tiny_model("gemma3", num_layers=4, sliding_window=WINDOW, rope_parameters=rope)
    refused(path, other, "rope_parameters")
    # A file written before rope_parameters was recorded is compared on the keys it holds.
    def drop_rope(metadata):
        recorded = json.loads(metadata["model_config"])
        del recorded["rope_parameters"]
        metadata["model_config"] = json.dumps(recorded, sort_keys=True)

    older = rewrite(tmp_path / "older.safetensors", path, edit_metadata=drop_rope, resign=True)
    assert load_context(older, model).cache.get_seq_length() > 0


@pytest.mark.parametrize("key, value", [("rms_norm_eps", 1e-2), ("hidden_activation", "silu"),
                                        ("query_pre_attn_scalar", 4), ("final_logit_softcapping", 2.0),
                                        ("attn_logit_softcapping", 1.0)])
def test_the_same_weights_under_another_config_that_shapes_keys_or_reads_them_are_refused(tmp_path, saved, key, value):
    """The weights fingerprint cannot tell these apart: the same weights with another norm epsilon,
    activation, query scale or soft cap loaded the context silently (rms_norm_eps 1e-2: last_logits
    1.1 away from the model's own prefill; query_pre_attn_scalar 4: all 8 greedy tokens differed)."""
    model, _, path, _ = saved
    other = make_tiny_model("gemma3", num_layers=4, sliding_window=WINDOW, **{key: value})
    refused(path, other, key)
    # A file written before these keys were recorded, or holding a key this release's config
    # lacks, is compared on the keys both hold.
    def older_and_foreign(metadata):
        recorded = json.loads(metadata["model_config"])
        del recorded[key]
        recorded["a_key_this_config_lacks"] = 1
        metadata["model_config"] = json.dumps(recorded, sort_keys=True)

    older = rewrite(tmp_path / "older.safetensors", path, edit_metadata=older_and_foreign, resign=True)
    assert load_context(older, model).cache.get_seq_length() > 0


def test_a_model_with_some_rows_fine_tuned_is_refused(tmp_path):
    """The weights fingerprint sampled each parameter's first 8 values: a model whose embeddings
    of the text's tokens (rows 40-79) were tuned had the same fingerprint, loaded the context
    silently and answered [67, 43, 103, 18, 25, ...] where its own prefill gives [67, 43, 103, 112, 102, ...]."""
    base, tuned = tiny("llama"), make_tiny_model("llama")
    with torch.no_grad():
        tuned.model.embed_tokens.weight[40:80] += 0.5 * torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    path = save_context(prefill(base, torch.arange(40, 100)[None], press=make_press(("chunkkv", {}), 0.5)),
                        tmp_path / "base.safetensors", base)
    refused(path, tuned, "different weights")
    assert load_context(path, base).cache.get_seq_length() > 0
    # A file written before the rows and columns were fingerprinted is checked on the sample.
    older = rewrite(tmp_path / "older.safetensors", path, resign=True,
                    edit_metadata=lambda metadata: metadata.pop("weights_fingerprint_lines"))
    assert load_context(older, tuned).cache.get_seq_length() > 0


def test_a_context_another_library_compressed_reports_its_kept_tokens_after_loading(tmp_path):
    """Such a context has no views: its kept count is measured at prefill. The file held it in
    its header but loading dropped it: a cache of 30 slots per layer reported all 70 tokens kept."""
    import contextlib

    @contextlib.contextmanager
    def keep_last_30(model):  # a press of another library: evicts in place after the forward
        def evict(module, args, kwargs, output):
            for layer in output.past_key_values.layers:
                layer.keys, layer.values = layer.keys[..., -30:, :], layer.values[..., -30:, :]

        handle = model.register_forward_hook(evict, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    model = tiny("llama")
    context = prefill(model, *left_padded((70,)), press=keep_last_30)
    assert context.kept_per_row().tolist() == [30]
    path = save_context(context, tmp_path / "foreign.safetensors", model)
    assert load_context(path, model).kept_per_row().tolist() == [30]
    plain = save_context(prefill(model, *left_padded((70,))), tmp_path / "plain.safetensors", model)
    assert load_context(plain, model).kept_per_row().tolist() == [70]


def test_a_context_whose_keys_another_library_masks_on_the_model_is_not_saved(tmp_path):
    """A press of another library that masks keys on the attention modules (kvpress' AdaKV:
    ``masked_key_indices``) leaves the cache whole: its file held every key and no mask, so the
    loaded context attended to all of them while its header said what was kept (kvpress' AdaKV
    at 0.7, tiny Llama: the full cache's answer, 24 of 80 "kept"). Refused; the masks are
    put back on the modules while the context is continued in memory."""
    import contextlib

    from kvpress_chunk.hf.hooks import find_attention_layers

    model = tiny("llama")
    modules = dict(find_attention_layers(model))

    @contextlib.contextmanager
    def mask_first_ten(model):  # masks keys 0..9 of head 0, as kvpress' masked_key_indices does
        yield
        for module in modules.values():
            module.masked_key_indices = (torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long), torch.arange(10))

    context = prefill(model, *left_padded((70,)), press=mask_first_ten)
    assert sorted(context.module_masks) == sorted(modules)
    with pytest.raises(SavedContextError, match="masks its keys"):
        save_context(context, tmp_path / "masked.safetensors", model)
    prefill(model, *left_padded((70,), seed=1))  # clears the stale masks of the modules
    seen = []
    handle = modules[0].register_forward_pre_hook(lambda module, args: seen.append(module.masked_key_indices))
    try:
        greedy_continue(model, context, torch.tensor([[5, 6]]), 2)
    finally:
        handle.remove()
    assert seen and all(mask is context.module_masks[0] for mask in seen)
    assert modules[0].masked_key_indices is None  # what the last prefill left, restored


def test_wrong_dtype(saved):
    _, _, path, _ = saved
    half = make_tiny_model("gemma3", num_layers=4, sliding_window=WINDOW, dtype=torch.bfloat16)
    refused(path, half, "bfloat16", "float32")


@pytest.mark.parametrize("name", ["cache.1.keys", "view.1.visible", "context.next_positions"])
def test_missing_tensor(tmp_path, saved, name):
    model, _, source, _ = saved
    path = rewrite(tmp_path / "missing.safetensors", source, edit_tensors=lambda tensors: tensors.pop(name))
    refused(path, model, "missing", name)


def test_unexpected_tensor(tmp_path, saved):
    model, _, source, _ = saved
    path = rewrite(tmp_path / "extra.safetensors", source,
                   edit_tensors=lambda tensors: tensors.update({"cache.9.keys": torch.zeros(1)}))
    refused(path, model, "unexpected", "cache.9.keys")


@pytest.mark.parametrize("version", ["99", "0", "", "one"])
def test_unknown_version(tmp_path, saved, version):
    model, _, source, _ = saved
    path = rewrite(tmp_path / "version.safetensors", source,
                   edit_metadata=lambda metadata: metadata.update(format_version=version), resign=True)
    refused(path, model, "format version", repr(version))


def test_not_a_saved_context(tmp_path, saved):
    model = saved[0]
    plain = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    refused(plain, model, "not a saved kvpress_chunk context")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file")
    refused(text, model, "not a readable safetensors file")
    refused(tmp_path / "absent.safetensors", model, "does not exist")


def _shrink(name, dim):
    def edit(tensors):
        tensor = tensors[name]
        tensors[name] = tensor.narrow(dim, 0, tensor.shape[dim] - 1).contiguous()

    return edit


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_shrink("cache.1.keys", 0), "layer 1"),
        (_shrink("cache.1.values", 2), "layer 1"),
        (_shrink("context.next_positions", 0), "next_positions"),
        (_shrink("context.attention_mask", 1), "attention_mask"),
        (_shrink("context.last_logits", 0), "last_logits"),
        (lambda t: t.update({"view.1.visible": torch.ones(2, 1, 999, dtype=torch.bool)}), "view of layer 1"),
        (lambda t: t.update({"view.1.visible": t["view.1.visible"].to(torch.uint8)}), "view of layer 1"),
        (lambda t: t.update({"cache.0.keys": t["cache.0.keys"].to(torch.float64)}), "layer 0"),
    ],
    ids=["keys-batch", "values-length", "positions", "mask", "logits", "view-width", "view-dtype", "keys-dtype"],
)
def test_wrong_shapes_even_with_a_valid_checksum(tmp_path, saved, edit, fragment):
    model, _, source, _ = saved
    path = rewrite(tmp_path / "shapes.safetensors", source, edit_tensors=edit, resign=True)
    refused(path, model, fragment)


def test_sliding_bookkeeping_is_checked(tmp_path, saved):
    model, _, source, _ = saved

    def edit(metadata):
        layers = json.loads(metadata["layers"])
        layers[0]["cumulative_length"] = 5  # fewer tokens seen than the layer holds
        metadata["layers"] = json.dumps(layers)

    path = rewrite(tmp_path / "sliding.safetensors", source, edit_metadata=edit, resign=True)
    refused(path, model, "cumulative_length")


def test_save_refuses_what_it_cannot_restore(tmp_path):
    model, context = build("llama", None, (40,))
    with pytest.raises(TypeError):
        save_context("not a context", tmp_path / "x.safetensors", model)
    with pytest.raises(TypeError, match="JSON"):
        save_context(context, tmp_path / "x.safetensors", model, blob=object())
    from transformers.cache_utils import StaticLayer

    context.cache.layers[0] = StaticLayer(max_cache_len=64)
    with pytest.raises(SavedContextError, match="StaticLayer"):
        save_context(context, tmp_path / "x.safetensors", model)
    assert not list(tmp_path.iterdir())


# -- CLI ----------------------------------------------------------------------------------------------


def run_cli(argv):
    from kvpress_chunk.cli_context import add_context_commands

    parser = argparse.ArgumentParser(prog="kvpress-chunk")
    add_context_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_errors(tmp_path, capsys, saved):
    out = str(tmp_path / "ctx.safetensors")
    assert run_cli(["compress", str(tmp_path / "absent.txt"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    assert run_cli(["compress", str(tmp_path / "empty.txt"), "--out", out]) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "doc.txt").write_text("some text")
    assert run_cli(["compress", str(tmp_path / "doc.txt"), "--press", "nosuchpress", "--out", out]) == 2
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["compress", str(tmp_path / "doc.txt"), "--ratio", "1.5", "--out", out])
    assert exit_info.value.code == 2
    capsys.readouterr()

    assert run_cli(["ask", str(tmp_path / "absent.safetensors"), "why?"]) == 2
    assert "does not exist" in capsys.readouterr().err
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    assert run_cli(["ask", str(plain), "why?"]) == 2
    assert "not a saved kvpress_chunk context" in capsys.readouterr().err
    model, context, _, _ = saved
    moved = save_context(context, tmp_path / "moved.safetensors", model, model_name=str(tmp_path / "gone"))
    assert run_cli(["ask", str(moved), "why?"]) == 2
    assert "no longer exists" in capsys.readouterr().err
    assert run_cli(["ask", str(moved), "why?", "--model", str(tmp_path / "nowhere")]) == 2
    assert "cannot load model" in capsys.readouterr().err


LIGHTHOUSE = ("The lighthouse keeper wrote in the log every night. " * 12) + "The secret code is 4817. " + (
    "Waves broke on the rocks below the tower. " * 12)


def smollm2_or_skip():
    """The embedded SmolLM2 and its tokenizer, or a skip saying why it is not installed."""
    from kvpress_chunk.hf.models import ModelNotInstalledError, load_default_model

    try:
        return load_default_model()
    except ModelNotInstalledError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_cli_compress_then_ask_matches_generate_answers(tmp_path, capsys):
    model, tokenizer = smollm2_or_skip()
    text = LIGHTHOUSE
    question = "What is the secret code?"
    document = tmp_path / "doc.txt"
    document.write_text(text)
    out = tmp_path / "doc.ctx.safetensors"
    assert run_cli(["compress", str(document), "--press", "chunkkv", "--ratio", "0.5", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert run_cli(["ask", str(out), question, "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out.strip()
    expected = kc.generate_answers(model, tokenizer, text, question, press=kc.make_press(
        "chunkkv", compression_ratio=0.5, compile=False), max_new_tokens=8)
    assert answer == expected[0]


@pytest.mark.slow
def test_cli_ask_compresses_while_decoding_when_the_saved_press_does(tmp_path, capsys):
    """A press with ``[decoding]`` saved by ``compress``: ``ask`` once answered outside the press,
    exactly as the press without decoding compression would (the cache grew past max_cache)."""
    model, tokenizer = smollm2_or_skip()
    text = LIGHTHOUSE
    question = "Summarise the text in detail, sentence by sentence."
    document, spec, out = tmp_path / "doc.txt", tmp_path / "dec.toml", tmp_path / "doc.ctx.safetensors"
    document.write_text(text)
    spec.write_text('preset = "chunkkv"\ncompression_ratio = 0.5\ncompile = false\n[decoding]\nevery = 4\nmax_cache = 100\n')
    assert run_cli(["compress", str(document), "--press", str(spec), "--out", str(out)]) == 0
    capsys.readouterr()
    assert run_cli(["ask", str(out), question, "--max-new-tokens", "40"]) == 0
    answer = capsys.readouterr().out.strip()
    from kvpress_chunk.spec import load_spec_file

    press = kc.make_press(load_spec_file(spec))
    expected = kc.generate_answers(model, tokenizer, text, question, press=press, max_new_tokens=40)
    without = kc.generate_answers(model, tokenizer, text, question, press=press.replace(decoding=None), max_new_tokens=40)
    assert expected != without, "the case must be one where decoding-time compression changes the answer"
    assert answer == expected[0]


def test_cli_compress_keeps_the_specs_own_budget_ratio_and_compile(tmp_path):
    """``--ratio`` / ``--compile`` change the spec only when given: their defaults once silently
    replaced a TOML's ``budget = 64`` by 75% removed (and its ``compile`` by False)."""
    from kvpress_chunk import make_press
    from kvpress_chunk.cli import build_parser
    from kvpress_chunk.cli_context import DEFAULT_RATIO, _press_from_args

    budget_file, ratio_file = tmp_path / "budget.toml", tmp_path / "ratio.toml"
    budget_file.write_text('preset = "snapkv"\nbudget = 64\ncompile = true\n')
    ratio_file.write_text('preset = "chunkkv"\ncompression_ratio = 0.3\n')

    def press_for(*options):
        return _press_from_args(make_press, build_parser().parse_args(["compress", "doc.txt", "--out", "x", *options]))

    from_budget = press_for("--press", str(budget_file))
    assert (from_budget.budget, from_budget.compression_ratio, from_budget.compile) == (64, None, True)
    assert press_for("--press", str(ratio_file)).compression_ratio == 0.3
    assert press_for("--press", "chunkkv").compression_ratio == DEFAULT_RATIO  # a preset names no budget
    assert press_for("--press", str(ratio_file), "--ratio", "0.5").compression_ratio == 0.5  # given: it wins
    assert press_for("--press", "chunkkv", "--compile").compile is True
    assert press_for("--press", "chunkkv").compile == "auto"


def _character_tokenizer(order: list[str]):
    """A real fast tokenizer (``tokenizers`` WordLevel, one token per character) whose ids
    follow ``order``: two orders are two tokenizers that encode the same text differently."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{char: i + 1 for i, char in enumerate(order)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_cli_ask_refuses_a_tokenizer_that_encodes_differently_from_the_one_compressed_with(tmp_path, capsys):
    """A saved context holds token states; ``ask`` encodes the question with the tokenizer it
    loads now. The same weights with another tokenizer (here: the folder's tokenizer replaced by
    one with another id order) answered from other ids than the context's, without a word."""
    model = make_tiny_model("llama", num_layers=2)
    folder = tmp_path / "model"
    characters = [chr(c) for c in range(32, 127)] + ["\n"]
    model.save_pretrained(folder)
    _character_tokenizer(characters).save_pretrained(folder)
    document = tmp_path / "doc.txt"
    document.write_text("The passcode for the amber vault is 4417203. " * 6)
    out = tmp_path / "doc.ctx.safetensors"
    assert run_cli(["compress", str(document), "--model", str(folder), "--press", "knorm", "--ratio", "0.5",
                    "--out", str(out)]) == 0
    assert run_cli(["ask", str(out), "What is the passcode?", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    _character_tokenizer(characters[::-1]).save_pretrained(folder)  # same weights, other ids
    assert run_cli(["ask", str(out), "What is the passcode?", "--max-new-tokens", "4"]) == 2
    assert "encodes text differently" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["greedy", "ragged", "teacher-forced"])
def test_a_context_saved_after_answering_holds_the_logits_after_its_last_token(tmp_path, how):
    """Hunt round 9: ``last_logits`` stayed the prefill's after greedy_continue /
    teacher_forced_logits, so a context saved after answering (file: "logits after the last
    token") led its loader to start from the token that followed the *prompt* (tiny llama: argmax
    [1, 79] instead of [96, 124], the tokens the context's last step predicted)."""
    from kvpress_chunk.generation import teacher_forced_logits
    from tiny_models import left_padded

    model = make_tiny_model("llama", num_layers=2)
    ids, mask, _ = left_padded([70, 55], seed=2)
    question = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(5))
    press = kc.make_press("chunkkv", compression_ratio=0.5, compile=False)
    with press(model):
        context = prefill(model, ids, mask)
        if how == "teacher-forced":
            predicted = teacher_forced_logits(model, context, question)[:, -1]
        else:
            asked = torch.ones_like(question)
            if how == "ragged":
                asked[1, :2] = 0  # row 1 asks a shorter question (left-padded)
            tokens = greedy_continue(model, context, question, max_new_tokens=6, attention_mask=asked)
        path = tmp_path / "answered.safetensors"
        context.save(path, model, press)
        loaded = CompressedContext.load(path, model)
        probe = torch.tensor([[7], [9]])
        expected = teacher_forced_logits(model, context.copy(), probe)
    if how == "teacher-forced":
        torch.testing.assert_close(context.last_logits.float(), predicted, rtol=0, atol=0)
    else:  # (a ragged batch's shorter question finished first and repeats its last token since)
        rows = slice(0, 1) if how == "ragged" else slice(None)
        assert torch.equal(context.last_logits.argmax(dim=-1)[rows], tokens[rows, -1])
    assert torch.equal(loaded.last_logits, context.last_logits.cpu())
    # the loaded context continues as the original: its last logits and its cache agree
    with press(model):
        torch.testing.assert_close(teacher_forced_logits(model, loaded, probe), expected, rtol=1e-5, atol=1e-5)


def test_a_decoding_press_context_keeps_which_remembered_tokens_are_padding(tmp_path):
    """The decoding state remembers the latest tokens' hidden states and which of them are real
    (expected attention's statistics read ``every`` of them; a short row's are partly its
    prompt's padding): a saved context restores that record, and continues as in-process."""
    from kvpress_chunk.decoding import DECODING_ATTR
    from tiny_models import left_padded

    model = make_tiny_model("llama", num_layers=2)
    press = kc.make_press("chunkkv-expected", compression_ratio=0.5, compile=False,
                          decoding={"every": 16, "max_cache": 24})
    ids, mask, _ = left_padded([40, 10], seed=5)
    with press(model):
        context = prefill(model, ids, mask)
        state = context.cache.__dict__[DECODING_ATTR]
        assert not bool(state.hidden_valid[0][1].all())  # the 10-token row's remembered padding
        loaded = load_context(save_context(context, tmp_path / "c.safetensors", model, press), model)
        restored = loaded.cache.__dict__[DECODING_ATTR]
        assert state.hidden_valid.keys() == restored.hidden_valid.keys()
        assert all(torch.equal(state.hidden_valid[i].cpu(), restored.hidden_valid[i].cpu()) for i in state.hidden_valid)
        question = torch.tensor([[5, 6], [7, 8]])
        expected = greedy_continue(model, context.copy(), question, 30)
        assert torch.equal(greedy_continue(model, loaded, question, 30), expected)

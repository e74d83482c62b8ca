"""Cache layers that grow in place (kvpress_chunk/hf/growing_layer.py).

The oracle is transformers' own ``DynamicLayer``: whatever sequence of updates, snapshots,
restores, crops and copies, a growing layer holds and hands out the same keys and values, and
never writes into a tensor it handed out (stock layers never do: ``cat`` makes new ones)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicLayer

import kvpress_chunk as kc
from kvpress_chunk.generation import new_cache
from kvpress_chunk.hf.growing_layer import GrowingDynamicLayer, flat_rows, grow_in_place, headroom
from tiny_models import make_tiny_model


def tokens(batch: int, heads: int, count: int, seed: int, dim: int = 4) -> torch.Tensor:
    return torch.randn(batch, heads, count, dim, generator=torch.Generator().manual_seed(seed))


def layer_pair(batch: int = 2, heads: int = 3, prefill: int = 20):
    """A stock layer and a growing one holding the same prefill."""
    stock, growing = DynamicLayer(), DynamicLayer()
    keys, values = tokens(batch, heads, prefill, 0), tokens(batch, heads, prefill, 1)
    stock.update(keys, values)
    growing.update(keys.clone(), values.clone())
    grow_in_place(growing)
    assert type(growing) is GrowingDynamicLayer
    return stock, growing


def both_update(stock, growing, count: int, seed: int):
    keys, values = tokens(stock.keys.shape[0], stock.keys.shape[1], count, seed), tokens(stock.keys.shape[0], stock.keys.shape[1], count, seed + 1)
    expected = stock.update(keys, values)
    got = growing.update(keys.clone(), values.clone())
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    return got


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 40)),
        st.tuples(st.just("snapshot"), st.just(0)),
        st.tuples(st.just("restore"), st.just(0)),
        st.tuples(st.just("crop"), st.integers(1, 10)),
    ),
    min_size=1, max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS, batch=st.integers(1, 3), heads=st.integers(1, 3), prefill=st.integers(1, 300))
def test_a_growing_layer_holds_what_a_stock_layer_holds_and_never_writes_into_what_it_handed_out(ops, batch, heads, prefill):
    stock, growing = layer_pair(batch, heads, prefill)
    handed: list[tuple[torch.Tensor, torch.Tensor]] = []  # every tensor handed out, with its contents then
    snapshots = []
    for step, (op, amount) in enumerate(ops):
        if op == "append":
            for tensor in both_update(stock, growing, amount, seed=10 * step):
                handed.append((tensor, tensor.clone()))
        elif op == "snapshot":  # by reference, as the context pass and prefix caches keep them
            snapshots.append((dict(stock.__dict__), dict(growing.__dict__)))
        elif op == "restore" and snapshots:
            stock_state, growing_state = snapshots.pop()
            stock.__dict__.clear(), stock.__dict__.update(stock_state)
            growing.__dict__.clear(), growing.__dict__.update(growing_state)
        elif op == "crop" and stock.get_seq_length() > amount:
            stock.crop(-amount)
            growing.crop(-amount)
        torch.testing.assert_close(growing.keys, stock.keys, rtol=0, atol=0)
        torch.testing.assert_close(growing.values, stock.values, rtol=0, atol=0)
    for tensor, contents in handed:
        torch.testing.assert_close(tensor, contents, rtol=0, atol=0)


def test_appends_write_into_one_buffer_until_its_headroom_is_used():
    stock, growing = layer_pair(prefill=320)
    both_update(stock, growing, 1, seed=5)  # takes ownership: one copy into a buffer with headroom
    buffer = growing.keys.untyped_storage().data_ptr()
    room = headroom(321)
    assert room == 20
    for step in range(room):
        both_update(stock, growing, 1, seed=10 + step)
        assert growing.keys.untyped_storage().data_ptr() == buffer
    both_update(stock, growing, 1, seed=99)  # full: one copy into a larger buffer
    assert growing.keys.untyped_storage().data_ptr() != buffer


def test_shallow_copies_of_a_layer_do_not_write_over_each_other():
    stock, growing = layer_pair()
    both_update(stock, growing, 1, seed=3)
    twin_stock, twin = copy.copy(stock), copy.copy(growing)  # share the record and the buffer
    both_update(stock, growing, 2, seed=7)
    both_update(twin_stock, twin, 3, seed=11)
    both_update(stock, growing, 1, seed=13)
    torch.testing.assert_close(growing.keys, stock.keys, rtol=0, atol=0)
    torch.testing.assert_close(twin.keys, twin_stock.keys, rtol=0, atol=0)


def test_a_deep_copy_grows_on_its_own():
    stock, growing = layer_pair()
    both_update(stock, growing, 1, seed=3)
    copy_stock, copied = copy.deepcopy(stock), copy.deepcopy(growing)
    both_update(stock, growing, 2, seed=7)
    both_update(copy_stock, copied, 2, seed=17)
    assert not torch.equal(growing.keys, copied.keys)


def test_a_buffer_made_in_inference_mode_is_replaced_rather_than_written_outside_it():
    stock, growing = layer_pair()
    with torch.inference_mode():
        both_update(stock, growing, 1, seed=3)
    assert growing.keys.is_inference()
    with torch.no_grad():  # model.generate's mode: writing into an inference tensor would raise
        both_update(stock, growing, 1, seed=5)
    assert not growing.keys.is_inference()


def test_tensors_that_need_autograd_are_concatenated_as_transformers_does():
    _, growing = layer_pair()
    keys, values = tokens(2, 3, 1, 3).requires_grad_(), tokens(2, 3, 1, 4).requires_grad_()
    out_keys, out_values = growing.update(keys, values)
    (out_keys.sum() + out_values.sum()).backward()
    assert keys.grad is not None and torch.equal(keys.grad, torch.ones_like(keys))
    assert out_keys.is_contiguous()  # the parent's cat, no buffer


@pytest.mark.parametrize("bad", ["batch", "heads", "dim", "dtype"])
def test_tokens_of_another_shape_or_dtype_fail_as_with_a_stock_layer(bad):
    stock, growing = layer_pair()
    both_update(stock, growing, 1, seed=3)
    shape = {"batch": (1, 3, 1, 4), "heads": (2, 1, 1, 4), "dim": (2, 3, 1, 5), "dtype": (2, 3, 1, 4)}[bad]
    keys = torch.zeros(shape, dtype=torch.float64 if bad == "dtype" else torch.float32)
    outcomes = []
    for layer in (stock, growing):
        try:
            result = layer.update(keys, keys.clone())
            outcomes.append(("ok", tuple(result[0].shape), result[0].dtype))
        except RuntimeError as exc:
            outcomes.append(("error", type(exc)))
    assert outcomes[0] == outcomes[1]


def test_only_plain_dynamic_layers_grow():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    sliding = DynamicSlidingWindowLayer(sliding_window=8)
    grow_in_place(sliding)
    assert type(sliding) is DynamicSlidingWindowLayer


@pytest.mark.parametrize("layout", ["contiguous", "growing", "transposed", "one-head", "one-row"])
def test_flat_rows_index_every_token_like_a_contiguous_reshape(layout):
    batch, heads, length, dim = 2, 3, 7, 4
    if layout == "contiguous":
        tensor = tokens(batch, heads, length, 0, dim)
    elif layout == "growing":
        tensor = tokens(batch, heads, length + 5, 0, dim)[..., :length, :]
    elif layout == "transposed":
        tensor = tokens(batch, length, heads, 0, dim).transpose(1, 2)
    elif layout == "one-head":
        tensor = tokens(batch, 1, length + 5, 0, dim)[..., :length, :]
    else:
        tensor = tokens(1, heads, length + 5, 0, dim)[..., :length, :]
    flat, row = flat_rows(tensor)
    batch, heads = tensor.shape[:2]
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                assert torch.equal(flat[(b * heads + h) * row + t], tensor[b, h, t])
    if layout != "transposed":
        assert flat.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()  # a view, no copy


@pytest.mark.parametrize("apply", ["evict", "mask"])
def test_generation_after_compression_grows_in_place_and_answers_as_with_stock_layers(apply, monkeypatch):
    model = make_tiny_model("llama", num_layers=3)
    ids = torch.randint(3, 120, (2, 60), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # a padded row too

    def run():
        press = kc.make_press("chunkkv", compression_ratio=0.5, apply=apply)
        cache = new_cache(model)
        with torch.no_grad(), press(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40, min_new_tokens=40,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return out, cache

    grown, cache = run()
    assert {type(layer) for layer in cache.layers} == {GrowingDynamicLayer}
    buffers = {layer.keys.untyped_storage().data_ptr() for layer in cache.layers}
    assert len(buffers) == len(cache.layers)
    monkeypatch.setattr("kvpress_chunk.session.grow_in_place", lambda layer: None)
    stock, stock_cache = run()
    assert {type(layer) for layer in stock_cache.layers} == {DynamicLayer}
    assert torch.equal(grown.sequences, stock.sequences)
    torch.testing.assert_close(torch.stack(grown.logits), torch.stack(stock.logits), rtol=1e-5, atol=1e-5)


def held_buffers(layer) -> set[int]:
    """Storages of every tensor a layer holds (its attributes and its growth record's)."""
    tensors = [value for value in layer.__dict__.values() if isinstance(value, torch.Tensor)]
    growth = layer.__dict__.get("_growth")
    if growth is not None:
        tensors += [growth.key_buffer, growth.value_buffer, growth.keys, growth.values]
    return {tensor.untyped_storage().data_ptr() for tensor in tensors}


@pytest.mark.parametrize("replace", ["evicted", "reordered", "selected"])
def test_keys_replaced_do_not_leave_the_old_buffer_alive(replace):
    """Hunt round 9: the record kept the buffer after the layer's keys were replaced (an
    eviction, a beam reorder), until the next update, or for good when none came."""
    _, growing = layer_pair()
    growing.update(tokens(2, 3, 1, 3), tokens(2, 3, 1, 4))
    assert "_growth" in growing.__dict__
    if replace == "evicted":  # what decoding-time compression does
        growing.keys, growing.values = tokens(2, 3, 5, 5).contiguous(), tokens(2, 3, 5, 6).contiguous()
    elif replace == "reordered":
        growing.reorder_cache(torch.tensor([1, 0]))
    else:
        growing.batch_select_indices(torch.tensor([1]))
    assert held_buffers(growing) == {growing.keys.untyped_storage().data_ptr(), growing.values.untyped_storage().data_ptr()}


def test_a_context_whose_decoding_ended_on_a_compression_holds_only_its_kept_tokens():
    """Evict mode bounds memory: after greedy decoding whose last step compressed (decoding-time
    compression), every layer held its pre-eviction buffer too (74240 bytes for 32768 of keys and
    values on this model, hunt round 9)."""
    model = make_tiny_model("llama", num_layers=2)
    ids = torch.randint(3, 120, (1, 200), generator=torch.Generator().manual_seed(0))
    press = kc.make_press("chunkkv", compression_ratio=0.5, decoding={"every": 16, "max_cache": 64}, compile=False)
    with press(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = kc.prefill(model, ids)
        kc.greedy_continue(model, context, ids[:, :3], max_new_tokens=17)  # the 17th forward compresses
    for layer in context.cache.layers:
        assert layer.keys.shape[-2] == 64
        assert held_buffers(layer) == {layer.keys.untyped_storage().data_ptr(), layer.values.untyped_storage().data_ptr()}

"""The compiled fused op (score -> group -> select -> gather) against its eager twin.

Each configuration is compiled once (tens of seconds on CPU), then driven through many prompt
lengths: with ``fail_on_recompile_limit_hit`` (conftest) an eager fallback would be an error,
and the cache-entry count shows that new lengths reuse the dynamic graph.
"""

import pytest
import torch
import torch._dynamo.eval_frame as eval_frame

import kvpress_chunk as kc
from kvpress_chunk.compile.ops import compiled_compress, eager_compress

pytestmark = pytest.mark.slow


def graphs_of(fn) -> int:
    return len(eval_frame._debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__))


def random_case(press, batch, length, pads=None, heads=3, q_heads=9, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    values = torch.randn(batch, heads, length, dim, generator=generator)
    valid = torch.ones(batch, length, dtype=torch.bool)
    for row, pad in enumerate(pads or []):
        valid[row, :pad] = False
    extra = {}
    if press.scorer.window:
        extra["queries"] = torch.randn(batch, q_heads, press.scorer.window, dim, generator=generator) * 0.3
    capacity = press.selector.capacity(
        length, press.scorer.window, press.rule, press.grouper.max_group_size, press.grouper.num_groups(length)
    )
    if press.allocator.pools_heads:
        capacity = length
    return keys, values, valid, extra, capacity, press.rule.value_tensor("cpu")


@pytest.mark.parametrize(
    "preset,batch",
    [("chunkkv", 1), ("chunkkv", 3), ("chunkkv-kvpress", 1), ("snapkv", 2), ("streamingllm", 1), ("chunkkv-adaptive", 2),
     ("chunkkv(reduce='max', per_head=True)", 2),
     ({"preset": "chunkkv-adaptive", "allocator": {"name": "adaptive", "floor": 0.3}}, 2)],
)
def test_compiled_equals_eager_over_many_lengths(preset, batch):
    press = kc.make_press(preset, compression_ratio=0.75)
    pooled, floor = press.allocator.pools_heads, press.allocator.pool_floor  # chunkkv-adaptive: the pooled path
    compiled = compiled_compress(press.scorer, press.grouper, press.selector, press.rule.kind, pooled, floor)
    eager = eager_compress(press.scorer, press.grouper, press.selector, press.rule.kind, pooled, floor)
    before = graphs_of(compiled)  # the same configuration may have compiled earlier in this process (other shapes)
    lengths = [97, 130, 256, 301, 512, 777, 1000, 1024, 1500, 2048, 3001, 4096]
    for i, length in enumerate(lengths):
        pads = [0] + [(7 * row * (i + 1)) % (length // 2) for row in range(1, batch)]
        args = random_case(press, batch, length, pads, seed=i)
        got, want = compiled(*args), eager(*args)
        for name, g, w in zip(("keys", "values", "indices", "slot_valid"), got, want):
            assert torch.equal(g, w), f"{preset} length {length}: compiled {name} differ from eager"
    # 12 lengths, one dynamic graph (plus at most one more for a size-1 specialisation).
    assert graphs_of(compiled) - before <= 2


def test_same_configuration_shares_compiled_graphs_and_others_do_not():
    a = kc.make_press("chunkkv", compression_ratio=0.75)
    b = kc.make_press("chunkkv", compression_ratio=0.5, compile=False)  # another ratio: same graphs
    c = kc.make_press("chunkkv", budget=64)
    d = kc.make_press("chunkkv", chunk_size=16, compression_ratio=0.75)
    fa = compiled_compress(a.scorer, a.grouper, a.selector, a.rule.kind)
    assert compiled_compress(b.scorer, b.grouper, b.selector, b.rule.kind) is fa
    for other in (c, d):
        fo = compiled_compress(other.scorer, other.grouper, other.selector, other.rule.kind)
        assert fo is not fa
        assert fo._torchdynamo_orig_callable.__code__ is not fa._torchdynamo_orig_callable.__code__


def test_a_ratio_sweep_reuses_one_graph():
    press = kc.make_press("knorm", compression_ratio=0.5)
    compiled = compiled_compress(press.scorer, press.grouper, press.selector, "ratio")
    eager = eager_compress(press.scorer, press.grouper, press.selector, "ratio")
    before = graphs_of(compiled)
    for ratio in (0.1, 0.5, 0.75, 0.9, 0.95):
        swept = press.replace(compression_ratio=ratio)
        args = random_case(swept, 2, 333, [0, 40])
        for g, w in zip(compiled(*args), eager(*args)):
            assert torch.equal(g, w)
    assert graphs_of(compiled) - before <= 2


def test_per_row_layer_budgets_compile_like_eager():
    """Allocators (pyramid) hand the op an int64[B] budget per row instead of the press ratio."""
    press = kc.make_press("pyramidkv", compression_ratio=0.75)
    compiled = compiled_compress(press.scorer, press.grouper, press.selector, "budget")
    eager = eager_compress(press.scorer, press.grouper, press.selector, "budget")
    before = graphs_of(compiled)
    for i, length in enumerate([130, 257, 600]):
        keys, values, valid, extra, _, _ = random_case(press, 2, length, [0, 31], seed=i)
        budgets = torch.tensor([length // 3, (length - 31) // 5])
        args = (keys, values, valid, extra, length // 3, budgets)
        for g, w in zip(compiled(*args), eager(*args)):
            assert torch.equal(g, w)
    assert graphs_of(compiled) - before <= 2

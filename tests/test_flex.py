"""FlexAttention paths against dense SDPA with an explicit boolean mask, and mask vs evict."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpress_chunk as kc
from kvpress_chunk.modes.block_masks import KV_BLOCK_SIZE, selection_block_mask
from kvpress_chunk.modes.flex import FLEX_STATUS, FlexRecompileLimit, compiled_graph_count, flex_attend
from tiny_models import make_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _room_for_test_shapes():
    # Tests sweep head layouts and lengths: more shapes than one serving run meets.
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def dense_oracle(kept: torch.Tensor, query_heads: int, q_length: int, kv_length: int) -> torch.Tensor:
    """The intended mask built directly from the kept table (not from the mask_mod)."""
    batch, kv_heads, prefix = kept.shape
    table = kept.repeat_interleave(query_heads // kv_heads, dim=1) if kv_heads > 1 else kept.expand(batch, query_heads, prefix)
    mask = torch.zeros(batch, query_heads, q_length, kv_length, dtype=torch.bool)
    mask[..., :prefix] = table[:, :, None, :]
    query_pos = torch.arange(kv_length - q_length, kv_length)
    new = torch.arange(prefix, kv_length)
    mask[..., prefix:] = new[None, :] <= query_pos[:, None]
    return mask


@settings(max_examples=20, deadline=None)
@given(
    batch=st.just(1),  # flex runs per batch row (see modes/flex.py); batches are tested end to end
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 3]),
    per_head=st.booleans(),
    prefix=st.integers(20, 150),
    new_tokens=st.integers(1, 5),
    block=st.just(16),
    keep=st.floats(0.05, 0.9),
    seed=st.integers(0, 1000),
)
def test_flex_block_mask_matches_dense_sdpa(batch, kv_heads, groups, per_head, prefix, new_tokens, block, keep, seed):
    q_length = 1
    generator = torch.Generator().manual_seed(seed)
    query_heads = kv_heads * groups
    kept = torch.rand(batch, kv_heads if per_head else 1, prefix, generator=generator) < keep
    kept[..., 0] = True  # every row attends to something
    kv_length = prefix + new_tokens
    block_mask = selection_block_mask(kept, query_heads, kv_length, block)
    want_mask = dense_oracle(kept, query_heads, q_length, kv_length)
    # The mask_mod states exactly the intended mask...
    # (device named: on a CUDA build of torch, create_mask defaults to CUDA even without a GPU)
    from torch.nn.attention.flex_attention import create_mask

    stated = create_mask(block_mask.mask_mod, batch, query_heads, q_length, kv_length, device=kept.device)
    assert torch.equal(stated.expand_as(want_mask), want_mask)
    # ...and the block lists never skip an allowed token nor call a block full that is not.
    blocks = block_mask.to_dense()[..., 0, :]  # [B, Hm, n_kv_blocks]: any listed block
    n_blocks = blocks.shape[-1]
    padded = torch.zeros(batch, query_heads, q_length, n_blocks * block, dtype=torch.bool)
    padded[..., :kv_length] = want_mask
    needed = padded.any(dim=2).view(batch, query_heads, n_blocks, block).any(dim=-1)
    assert bool((blocks.expand_as(needed).bool() | ~needed).all())
    query = torch.randn(batch, query_heads, q_length, 16, generator=generator)
    key = torch.randn(batch, kv_heads, kv_length, 16, generator=generator)
    value = torch.randn(batch, kv_heads, kv_length, 16, generator=generator)
    got = flex_attend(query, key, value, block_mask, 0.25)
    want = F.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=want_mask, scale=0.25
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@given(
    batch=st.integers(1, 2), kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3]),
    prefix=st.integers(5, 60), q_length=st.integers(2, 6), seed=st.integers(0, 1000),
)
@settings(max_examples=30, deadline=None)
def test_dense_prefix_mask_for_multi_token_queries_matches_the_oracle(batch, kv_heads, groups, prefix, q_length, seed):
    from kvpress_chunk.modes.block_masks import dense_prefix_mask

    kept = torch.rand(batch, kv_heads, prefix, generator=torch.Generator().manual_seed(seed)) < 0.5
    kv_length = prefix + q_length + 2
    got = dense_prefix_mask(kept, kv_heads * groups, q_length, kv_length)
    want = dense_oracle(kept, kv_heads * groups, q_length, kv_length)
    assert torch.equal(got.expand_as(want), want)


def next_logits(model, ids, press, steps):
    cache = DynamicCache(config=model.config)
    length = ids.shape[1]
    outs = []
    with press(model), torch.no_grad():
        model(ids, past_key_values=cache)
        position = length
        for step in steps:
            out = model(step, past_key_values=cache, position_ids=torch.arange(position, position + step.shape[1])[None])
            outs.append(out.logits)
            position += step.shape[1]
    return outs, cache


@pytest.mark.parametrize("kernel", ["flex", "gather"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
@pytest.mark.parametrize("preset", ["chunkkv", "snapkv"])
def test_mask_mode_gives_the_logits_of_evict_mode(family, preset, kernel, monkeypatch):
    monkeypatch.setenv("KVPRESS_CHUNK_MASK_DECODE", kernel)
    model = make_tiny_model(family)
    ids = torch.randint(3, 120, (1, 230), generator=torch.Generator().manual_seed(1))
    steps = [torch.tensor([[5, 17, 42]]), torch.tensor([[9]]), torch.tensor([[11]])]
    evict, evict_cache = next_logits(model, ids, kc.make_press(preset, compression_ratio=0.75, compile=False), steps)
    masked, mask_cache = next_logits(model, ids, kc.make_press(preset, compression_ratio=0.75, compile=False, apply="mask"), steps)
    assert mask_cache.layers[0].keys.shape[-2] == 230 + 5  # the cache stays whole
    window = kc.make_press(preset, compression_ratio=0.75).scorer.window  # protected, even past the budget
    assert evict_cache.layers[0].keys.shape[-2] == max(int(230 * 0.25), window) + 5
    for e, m in zip(evict, masked):
        torch.testing.assert_close(m, e, rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # restored


HUNDRED_STEPS = """
import json, os, sys, torch, warnings
os.environ["KVPRESS_CHUNK_MASK_DECODE"] = "flex"  # the CPU default gathers instead (modes/gathered.py)
sys.path.insert(0, sys.argv[1])
torch._dynamo.config.fail_on_recompile_limit_hit = True
warnings.simplefilter("error", RuntimeWarning)  # a fallback to dense SDPA must fail this check
import kvpress_chunk as kc
from kvpress_chunk.modes.flex import FLEX_STATUS, compiled_graph_count
from kvpress_chunk.generation import greedy_continue, prefill
from tiny_models import make_tiny_model
model = make_tiny_model("llama")
press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False, apply="mask")
ids = torch.randint(3, 120, (1, 300), generator=torch.Generator().manual_seed(2))
with press(model):
    context = prefill(model, ids)
    tokens = greedy_continue(model, context, torch.tensor([[7, 8, 9]]), max_new_tokens=100)
print(json.dumps({"tokens": tokens.shape[1], "graphs": compiled_graph_count(), "broken": FLEX_STATUS.broken}))
"""


def test_hundred_decoding_steps_compile_few_graphs_and_never_fall_back():
    """In a fresh process (graph counts of earlier tests would blur the picture)."""
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", HUNDRED_STEPS, os.path.dirname(__file__)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"tokens": 100, "graphs": report["graphs"], "broken": False}
    assert 1 <= report["graphs"] <= 2, report


def test_a_recompile_storm_is_refused_before_silent_fallback():
    kept = torch.ones(1, 1, 40, dtype=torch.bool)
    query, key, value = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 41, 8), torch.randn(1, 2, 41, 8)
    flex_attend(query, key, value, selection_block_mask(kept, 2, 41, 16), 0.3)  # this geometry's first graph
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=False, recompile_limit=2), pytest.raises(
        FlexRecompileLimit, match="recompile limit"
    ):
        flex_attend(query, key, value, selection_block_mask(kept, 2, 41, 48), 0.3)  # a new block size: new graph


def test_each_attention_geometry_has_its_own_recompile_budget():
    kept = torch.ones(1, 1, 40, dtype=torch.bool)
    for heads, dim in ((2, 8), (4, 8), (2, 16)):
        query, key = torch.randn(1, heads, 1, dim), torch.randn(1, heads, 41, dim)
        flex_attend(query, key, key, selection_block_mask(kept, heads, 41, 16), 0.5)
    from kvpress_chunk.modes.flex import graph_counts

    mine = {geometry: count for geometry, count in graph_counts().items() if geometry[-1] == 0.5}
    assert len(mine) == 3 and all(count == 1 for count in mine.values())


def test_kv_blocks_that_compiled_cpu_flex_gets_wrong_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        selection_block_mask(torch.ones(1, 1, 40, dtype=torch.bool), 2, 41, 10)
    assert KV_BLOCK_SIZE == 16


def test_mask_mode_refuses_models_without_attention_interface():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = make_tiny_model("llama").model.layers[0].self_attn

    with pytest.raises(kc.UnsupportedModelError, match="PreTrainedModel"):
        with kc.make_press("chunkkv", compression_ratio=0.5, apply="mask")(Plain()):
            pass


def test_unknown_apply_mode_is_refused():
    with pytest.raises(kc.SpecError, match="apply must be one of evict, mask"):
        kc.make_press("chunkkv", compression_ratio=0.5, apply="virtual")


def test_mask_mode_answers_like_evict_mode_on_smollm2():
    from kvpress_chunk.eval.tasks import make_case

    model, tokenizer = kc.load_default_model()
    case = make_case(tokenizer, "niah", 1000, 0.5, seed=4)
    answers = {}
    for mode in ("evict", "mask"):
        press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False, apply=mode)
        answers[mode] = kc.generate_answers(model, tokenizer, case.context, case.question, press=press, max_new_tokens=20)
    assert answers["mask"] == answers["evict"]
    assert model.config._attn_implementation == "sdpa"


def test_head_adaptive_press_runs_in_mask_mode():
    model = make_tiny_model("qwen2")
    press = kc.make_press("chunkkv-adaptive", compression_ratio=0.75, compile=False, apply="mask")
    ids = torch.randint(3, 120, (1, 200), generator=torch.Generator().manual_seed(5))
    steps = [torch.tensor([[5, 6]]), torch.tensor([[9]])]
    logits, cache = next_logits(model, ids, press, steps)
    assert cache.layers[0].keys.shape[-2] == 203
    assert all(torch.isfinite(x).all() for x in logits)
    with press(model) as session, torch.no_grad():
        model(ids, past_key_values=DynamicCache(config=model.config))
    counts = session.selections[0].slot_valid[0].sum(dim=-1)
    assert int(counts.sum()) == 2 * max(int(200 * 0.25), 32)


def test_padded_batch_in_mask_mode_matches_evict_mode():
    from kvpress_chunk.generation import greedy_continue, prefill

    model = make_tiny_model("llama")
    rows = [torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(n)) for n in (150, 97)]
    ids = torch.zeros(2, 150, dtype=torch.long)
    mask = torch.zeros(2, 150, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 150 - len(row):] = row
        mask[r, 150 - len(row):] = 1
    question = torch.tensor([[11, 12, 13]] * 2)
    outputs = {}
    for mode in ("evict", "mask"):
        press = kc.make_press("chunkkv", compression_ratio=0.7, compile=False, apply=mode)
        with press(model):
            context = prefill(model, ids, mask)
            outputs[mode] = greedy_continue(model, context, question, max_new_tokens=6)
    assert torch.equal(outputs["mask"], outputs["evict"])


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 3]),
    per_head=st.booleans(),
    prefix=st.integers(20, 150),
    new_tokens=st.integers(1, 40),
    keep=st.floats(0.05, 0.9),
    seed=st.integers(0, 1000),
)
def test_prefix_blocks_decode_batched_rows_like_dense_sdpa(batch, kv_heads, groups, per_head, prefix, new_tokens, keep, seed):
    """The decode path: block tables built once per prefix and extended as the cache grows, batch
    rows folded into heads, one flex call; against SDPA with the dense mask, at every length."""
    from kvpress_chunk.modes.block_masks import PrefixBlocks
    from kvpress_chunk.modes.flex import flex_decode_step

    generator = torch.Generator().manual_seed(seed)
    query_heads = kv_heads * groups
    kept = torch.rand(batch, kv_heads if per_head else 1, prefix, generator=generator) < keep
    kept[..., 0] = True
    blocks = PrefixBlocks(kept, query_heads, KV_BLOCK_SIZE)
    for kv_length in sorted({prefix + 1, prefix + new_tokens, prefix + 16, prefix + 17}):
        query = torch.randn(batch, query_heads, 1, 16, generator=generator)
        key = torch.randn(batch, kv_heads, kv_length, 16, generator=generator)
        value = torch.randn(batch, kv_heads, kv_length, 16, generator=generator)
        want_mask = dense_oracle(kept, query_heads, 1, kv_length)
        # the folded BlockMask's mask_mod states the intended mask, row by row
        from torch.nn.attention.flex_attention import create_mask

        block_mask = blocks.block_mask(kv_length)
        folded = create_mask(block_mask.mask_mod, 1, batch * query_heads, 1, kv_length, device=kept.device)
        assert torch.equal(folded.view(batch, query_heads, 1, kv_length), want_mask)
        got = flex_decode_step(query, key, value, blocks, 0.25)
        assert got is not None and not FLEX_STATUS.broken
        want = F.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=want_mask, scale=0.25
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefix_blocks_never_skip_a_visible_block():
    from kvpress_chunk.modes.block_masks import PrefixBlocks

    kept = torch.zeros(2, 1, 70, dtype=torch.bool)
    kept[0, 0, :16] = True  # row 0: first block full, the rest skipped
    kept[1, 0, 20:25] = True  # row 1: block 1 partial
    blocks = PrefixBlocks(kept, 2, 16)
    for kv_length in (71, 80, 81, 100, 129):
        mask = blocks.block_mask(kv_length)
        dense = mask.to_dense()[0, :, 0]  # [B*Hq, n blocks]: listed anywhere (full or partial)
        n = -(-kv_length // 16)
        assert dense.shape[-1] == n
        want = torch.zeros(4, n, dtype=torch.bool)
        want[:2, 0] = True
        want[2:, 1] = True
        want[:, 4:] = True  # block 4 straddles the prefix end (64..79); all later blocks hold new tokens
        assert torch.equal(dense.bool(), want), kv_length
        full = torch.zeros(4, n, dtype=torch.int32)
        for h in range(4):
            full[h, mask.full_kv_indices[0, h, 0, : mask.full_kv_num_blocks[0, h, 0]].long()] = 1
        assert bool(full[:2, 0].all()) and not bool(full[:, 4].any()) and not bool(full[:, n - 1].any())


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 3]),
    per_head=st.booleans(),
    prefix=st.integers(5, 150),
    new_tokens=st.integers(1, 20),
    keep=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_gathered_decode_matches_dense_sdpa(batch, kv_heads, groups, per_head, prefix, new_tokens, keep, seed):
    """The CPU decode path of mask mode (modes/gathered.py): kept slots listed once per prefix,
    gathered per step; ragged rows and heads (different kept counts) padded and masked."""
    from kvpress_chunk.modes.gathered import PrefixSlots

    generator = torch.Generator().manual_seed(seed)
    query_heads = kv_heads * groups
    kept = torch.rand(batch, kv_heads if per_head else 1, prefix, generator=generator) < keep
    kept[..., 0] = True
    slots = PrefixSlots(kept)
    for kv_length in (prefix + 1, prefix + new_tokens):
        query = torch.randn(batch, query_heads, 1, 16, generator=generator)
        key = torch.randn(batch, kv_heads, kv_length, 16, generator=generator)
        value = torch.randn(batch, kv_heads, kv_length, 16, generator=generator)
        want_mask = dense_oracle(kept, query_heads, 1, kv_length)
        want = F.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=want_mask, scale=0.25
        )
        torch.testing.assert_close(slots.attend(query, key, value, 0.25), want, rtol=1e-5, atol=1e-5)


def test_decode_kernel_choice(monkeypatch):
    from kvpress_chunk.modes.gathered import decode_kernel

    monkeypatch.delenv("KVPRESS_CHUNK_MASK_DECODE", raising=False)
    assert decode_kernel(torch.device("cpu")) == "gather"
    assert decode_kernel(torch.device("meta")) == "flex"  # accelerators: flex skips blocks in its kernel
    monkeypatch.setenv("KVPRESS_CHUNK_MASK_DECODE", "flex")
    assert decode_kernel(torch.device("cpu")) == "flex"
    monkeypatch.setenv("KVPRESS_CHUNK_MASK_DECODE", "dense")
    with pytest.raises(ValueError, match="flex, gather"):
        decode_kernel(torch.device("cpu"))

"""Prefill overhead on the embedded SmolLM2 (30 layers): prefill with a press vs without.

Two views of the same cost:

* ``test_prefill_overhead``: a whole prefill (one forward from an empty cache, last logits only)
  with each press applied, as a percentage over the plain prefill of the same run. This is what
  a user pays; at a few percent it is close to the machine's run-to-run noise.
* ``test_compression_of_all_layers``: only the presses' work, on the 30 layers' inputs captured
  from a real prefill (hidden states, keys, values, RoPE tables), so that it can be measured
  precisely, shown as a share of the plain prefill, and so that layer reuse (``reuse_every=2``:
  odd layers gather with the even layer's indices and skip scoring) shows its saving.

Presses: ``chunkkv`` (paper variant, compiled), the same with ``reuse_every=2``, our
``chunkkv-kvpress`` (compiled) and kvpress' ``ChunkKVPress(SnapKVPress(0.75), chunk_length=20)``.
Before timing, each press must keep the expected number of tokens per layer, and
``chunkkv-kvpress`` must leave exactly kvpress' cache.
"""

from __future__ import annotations

import pytest
import torch

import kvpress_chunk as kc
from workloads import SMOKE_LENGTH, cache_bytes, capture_layer_inputs, prompt_ids, run_prefill, smoke_only, smollm2

kvpress = pytest.importorskip("kvpress")

RATIO = 0.75
LENGTHS = [smoke_only(SMOKE_LENGTH), 2048, 4096]


def press_factories():
    """``name -> (label, factory)`` where ``factory()`` returns a context-manager maker or None."""
    return {
        "none": ("no press (plain prefill)", lambda: None),
        "chunkkv": ("chunkkv, compiled", lambda: kc.make_press("chunkkv", compression_ratio=RATIO, compile=True)),
        "chunkkv-reuse2": ("chunkkv reuse_every=2, compiled",
                           lambda: kc.make_press("chunkkv", compression_ratio=RATIO, reuse_every=2, compile=True)),
        "chunkkv-kvpress": ("chunkkv-kvpress, compiled", lambda: kc.make_press("chunkkv-kvpress", compression_ratio=RATIO, compile=True)),
        "kvpress": ("kvpress ChunkKVPress(SnapKVPress, 20)",
                    lambda: kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=RATIO), chunk_length=20)),
    }


_KVPRESS_CACHES: dict[int, object] = {}


def kvpress_cache(model, length):
    if length not in _KVPRESS_CACHES:
        _KVPRESS_CACHES[length] = run_prefill(model, prompt_ids(length), press_factories()["kvpress"][1]())
    return _KVPRESS_CACHES[length]


@pytest.mark.parametrize("name", list(press_factories()))
@pytest.mark.parametrize("length", LENGTHS)
def test_prefill_overhead(benchmark, length, name):
    model, _ = smollm2()
    ids = prompt_ids(length)
    label, factory = press_factories()[name]
    press = factory()
    cache = run_prefill(model, ids, press)  # check, and warm-up (compiles the op)
    kept = cache.get_seq_length()
    if name in ("none", "chunkkv", "chunkkv-reuse2"):
        assert kept == (length if press is None else int(length * (1 - RATIO)))  # exact budget
    else:  # whole chunks of 20, kvpress' rule: compared with kvpress' own cache below
        assert kept < length
    if name == "chunkkv-kvpress":
        reference = kvpress_cache(model, length)
        for ours, theirs in zip(cache.layers, reference.layers):
            assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    benchmark.group = f"prefill, SmolLM2, {length} tokens, 75% removed"
    benchmark.extra_info.update(label=label, baseline=press is None, reading="overhead",
                                facts={"cache MB": f"{cache_bytes(cache) / 1e6:.1f}"})
    benchmark.pedantic(run_prefill, args=(model, ids, press), rounds=3, iterations=1)


def compress_all_layers(press, captured):
    """The hooks' per-layer work over a whole model (planner, then select or reuse)."""
    selections = {}
    compressed = [inputs.layer_idx for inputs in captured]  # SmolLM2: every layer, none slides
    for inputs in captured:
        *_, selections[inputs.layer_idx] = press.compress_layer(inputs, selections, compressed)
    return selections


def kvpress_all_layers(press, captured):
    return [press.compress(inputs.module, inputs.hidden_states, inputs.keys, inputs.values, None,
                           {"position_embeddings": inputs.position_embeddings}) for inputs in captured]


@pytest.mark.parametrize("name", ["chunkkv", "chunkkv-reuse2", "chunkkv-kvpress", "kvpress"])
@pytest.mark.parametrize("length", LENGTHS)
def test_compression_of_all_layers(benchmark, length, name):
    model, _ = smollm2()
    captured = capture_layer_inputs(model, prompt_ids(length))
    label, factory = press_factories()[name]
    press = factory()
    run = (lambda: kvpress_all_layers(press, captured)) if name == "kvpress" else (lambda: compress_all_layers(press, captured))
    with torch.inference_mode():
        result = run()  # check, and warm-up (compiles the op)
        if name in ("chunkkv", "chunkkv-reuse2"):
            kept = {int(selection.kept_per_row[0]) for selection in result.values()}
            assert kept == {int(length * (1 - RATIO))}
            if name == "chunkkv-reuse2":
                assert all(result[i] is result[i - 1] for i in range(1, len(result), 2))
        if name == "chunkkv-kvpress":
            reference = kvpress_all_layers(press_factories()["kvpress"][1](), captured)
            for inputs, (want_keys, want_values) in zip(captured, reference):
                keys, values = result[inputs.layer_idx].apply(inputs.keys, inputs.values)
                assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
        benchmark.group = f"compression work of all 30 layers, SmolLM2 inputs, {length} tokens"
        benchmark.extra_info.update(label=label, baseline=name == "chunkkv", reading="speedup",
                                    share_of=f"prefill, SmolLM2, {length} tokens, 75% removed")
        benchmark(run)

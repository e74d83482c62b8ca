"""Memory of a prefill on the embedded SmolLM2: with ChunkKV (75% removed) vs without a press.

Figures per case (in the ``figures`` column of the summary):

* ``peak MB``: how far the process's resident memory rose above its level before the prefill
  (Linux high-water mark, reset before the call): all of it, activations and attention buffers
  included;
* ``max live cache MB``: the largest cache footprint at any point of the prefill, read after
  every attention layer (before the press compresses that layer);
* ``full cache MB``: what the cache of all layers would hold uncompressed;
* ``kept cache MB``: the cache left after the prefill.

The press compresses each layer as soon as its attention has run, so ``max live cache`` stays
near ``kept + one layer`` and far below ``full cache``: the uncompressed cache of all layers is
never alive at once. The prefill time is recorded too (one round: a memory benchmark).
"""

from __future__ import annotations

import pytest

import kvpress_chunk as kc
from workloads import SMOKE_LENGTH, LiveCacheProbe, cache_bytes, peak_rss_growth, prompt_ids, run_prefill, smoke_only, smollm2

RATIO = 0.75


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f}"


@pytest.mark.parametrize("name", ["none", "chunkkv"])
@pytest.mark.parametrize("length", [smoke_only(SMOKE_LENGTH), 2048, 4096])
def test_prefill_memory(benchmark, length, name):
    model, _ = smollm2()
    ids = prompt_ids(length)
    press = kc.make_press("chunkkv", compression_ratio=RATIO) if name == "chunkkv" else None
    run_prefill(model, ids, press)  # warm-up: compiles the op, settles the allocator
    with LiveCacheProbe(model) as probe:
        peak, cache = peak_rss_growth(lambda: run_prefill(model, ids, press))
    config = model.config
    full = 2 * config.num_hidden_layers * config.num_key_value_heads * length * config.head_dim * 4  # fp32 K and V
    kept = cache_bytes(cache)
    if press is None:
        assert kept == full and probe.peak == full
    else:
        layer = full // config.num_hidden_layers
        assert kept == pytest.approx(full * (1 - RATIO), rel=0.01)
        assert probe.peak <= kept + layer  # one uncompressed layer at a time, never the whole cache
    benchmark.group = f"memory of a prefill, SmolLM2, {length} tokens"
    benchmark.extra_info.update(
        label="no press" if press is None else "chunkkv, 75% removed", baseline=press is None, reading="overhead",
        facts={"peak MB": megabytes(peak), "max live cache MB": megabytes(probe.peak),
               "full cache MB": megabytes(full), "kept cache MB": megabytes(kept)},
    )
    benchmark.pedantic(run_prefill, args=(model, ids, press), rounds=1, iterations=1)

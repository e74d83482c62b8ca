"""Decoding-time compression (issue 12): tokens/s and memory over a long generation on the
embedded SmolLM2, full cache vs ``decoding={"every": 64, "max_cache": M}`` (M = 512/1024/2048).

Two rates are reported: over the whole generation (the benchmark's time) and over its last
``TAIL`` tokens (``last 512 tokens``), i.e. the rate *at* 4k generated, where the full cache is
longest and each step reads the most. On a small model the weights dominate a decoding step's
memory traffic, so the whole-run ratio is bounded by the average cache length, not the final one.

Each round prefills a short prompt and decodes ``GEN`` tokens (default 4096; env
``KVPRESS_DECODING_GEN`` to change) feeding a fixed token sequence, so every round does the same
work whatever the press keeps. Read the ratios to the full cache (tokens per second); facts give
the peak cached tokens per row and the peak resident-memory growth of the round.

The smoke case (normal test run) decodes 96 tokens with M=48 once: it checks the bound, not speed.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import kvpress_chunk as kc
from kvpress_chunk.generation import applied
from kvpress_chunk.hf.hooks import cache_keyword
from workloads import cache_bytes, new_cache, peak_rss_growth, prompt_ids, smollm2

GEN = int(os.environ.get("KVPRESS_DECODING_GEN", "4096"))
EVERY = 64
PROMPT = 256
TAIL = 512
CASES = [pytest.param(GEN, None, id=f"{GEN}-full")] + [
    pytest.param(GEN, m, id=f"{GEN}-M{m}") for m in (512, 1024, 2048)
] + [pytest.param(96, 48, id="96-M48-smoke", marks=pytest.mark.smoke)]


def decode(model, gen: int, max_cache: int | None):
    every = EVERY if gen > 200 else 16
    press = None if max_cache is None else kc.make_press(
        "chunkkv", compression_ratio=0.0, decoding={"every": every, "max_cache": max_cache})
    feed = prompt_ids(PROMPT + gen)
    with torch.inference_mode(), applied(press, model) as session:
        cache = new_cache(model)
        kw = {cache_keyword(model): cache}
        model(feed[:, :PROMPT], logits_to_keep=1, **kw)
        tail = min(TAIL, gen // 4)
        for step in range(PROMPT, PROMPT + gen):
            if step == PROMPT + gen - tail:
                tail_start = time.perf_counter()
            model(feed[:, step:step + 1], position_ids=torch.tensor([[step]]), logits_to_keep=1, **kw)
        tail_seconds = time.perf_counter() - tail_start
        peak = session.decoder.max_seen if session is not None else PROMPT + gen
        return peak, cache_bytes(cache), max_cache, every, {"tokens": tail, "seconds": tail_seconds}


@pytest.mark.parametrize("gen,max_cache", CASES)
def test_decoding(benchmark, gen, max_cache):
    model, _ = smollm2()
    # Set the group before the timed call: pytest-benchmark records it with the timing.
    benchmark.group = f"long generation, SmolLM2, {PROMPT}-token prompt, {gen} generated tokens"
    runs = []
    benchmark.pedantic(lambda: runs.append(peak_rss_growth(lambda: decode(model, gen, max_cache))), rounds=1, iterations=1)
    rss, (peak, final_bytes, m, every, tail) = runs[-1]
    if m is not None:
        assert peak <= m + every, (peak, m, every)
    label = "full cache" if m is None else f"decoding compression, M={m}, every {every}"
    benchmark.extra_info.update(label=label, baseline=m is None, reading="throughput", tokens=gen, tail=tail,
                                facts={"peak cached tokens": peak, "final cache MB": round(final_bytes / 2**20, 1),
                                       "peak RSS growth MB": round(rss / 2**20, 1)})

"""Fidelity of a compressed prose context on the embedded SmolLM2, and what one fidelity run costs.

One window of the shipped prose (``eval.fidelity.make_windows``): the context is prefilled and
compressed query-agnostically, the next 32 tokens are scored teacher-forced in one forward. The
timed figure is the whole run (prefill + compression + continuation) as an overhead over the full
cache's run of the same window; the quality figures (ΔNLL, KL to the full cache, top-1 agreement)
go into ``facts``. Quality is checked, not only timed: a press that removes tokens must move the
predictions (KL > 0) and the full cache must agree with itself.
"""

from __future__ import annotations

import math

import pytest

import kvpress_chunk as kc
from kvpress_chunk.eval.fidelity import compare, continuation_logprobs, make_windows
from workloads import smollm2

RATIO = 0.75
PRESSES = ["none", "chunkkv", "snapkv", "streamingllm", "knorm"]
SMOKE = {(512, "chunkkv")}  # run once, untimed, by the normal test run
CASES = [
    pytest.param(length, name, marks=[pytest.mark.smoke] if (length, name) in SMOKE else [])
    for length in (512, 2048) for name in PRESSES
]


@pytest.mark.parametrize("length, name", CASES)
def test_fidelity_run(benchmark, length, name):
    model, tokenizer = smollm2()
    (window,) = make_windows(tokenizer, length, 32, count=1, seed=0)
    press = None if name == "none" else kc.make_press(name, compression_ratio=RATIO)
    full, full_kept = continuation_logprobs(model, tokenizer, window)
    logprobs, kept = continuation_logprobs(model, tokenizer, window, press)
    figures = compare(full, logprobs, window.continuation_ids[0])
    assert all(math.isfinite(value) for value in figures.values())
    if press is None:
        assert figures["kl"] == 0 and figures["delta_nll"] == 0 and figures["top1"] == 1
    else:
        assert kept < full_kept and figures["kl"] > 0
    benchmark.group = f"fidelity run, SmolLM2, {length}-token prose + 32 scored, {RATIO:.0%} removed"
    benchmark.extra_info.update(
        label="full cache" if press is None else name, baseline=press is None, reading="overhead",
        facts={"ΔNLL": f"{figures['delta_nll']:+.3f}", "KL": f"{figures['kl']:.3f}", "top-1": f"{figures['top1']:.0%}"},
    )
    benchmark.pedantic(continuation_logprobs, args=(model, tokenizer, window, press), rounds=2, iterations=1)

"""Decoding speed on the embedded SmolLM2 after a 4k / 8k-token prefill: full cache vs caches
compressed by ChunkKV at 50 / 75 / 90%, evicted (a smaller cache) or masked (the whole cache,
attended through the selection: on CPU by gathering the visible slots per step, see
``kvpress_chunk/modes/gathered.py``; ``mask-flex`` forces the FlexAttention block-mask kernel,
the default on accelerators, to show what it costs here).

Each round decodes ``STEPS`` tokens (a fixed token sequence, so every round does the same work)
with explicit positions continuing from the original length; before each round, untimed, the
cache is cropped back to its post-prefill length and one token is decoded (see ``rewind``: a
compressed layer grows in place, and that first step after the crop makes its one copy). Read
the ratios to the full cache (tokens per second).

Checks before timing: an evicted cache keeps exactly ``int(T * (1 - ratio))`` tokens per layer,
and mask mode gives the evict mode's logits for the same press (to 1e-4).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import kvpress_chunk as kc
from kvpress_chunk.generation import applied
from kvpress_chunk.hf.hooks import cache_keyword
from kvpress_chunk.session import CONTINUATION_ATTR, continuation_of
from workloads import SMOKE_LENGTH, new_cache, prompt_ids, smoke_only, smollm2

STEPS = 8


def case_id(length: int, mode: str, ratio: float) -> str:
    return f"{length}-{mode}" + (f"-{ratio}" if mode != "full" else "")


SMOKE_MODES = [("full", 0.0), ("evict", 0.75), ("mask", 0.75), ("mask-flex", 0.75)]
CASES = [smoke_only(SMOKE_LENGTH, mode, ratio, id=case_id(SMOKE_LENGTH, mode, ratio)) for mode, ratio in SMOKE_MODES] + [
    pytest.param(length, mode, ratio, id=case_id(length, mode, ratio))
    for length in (4096, 8000)  # SmolLM2 has 8192 positions: 8000 leaves room for decoding
    for mode, ratio in [("full", 0.0)] + [(m, r) for m in ("evict", "mask") for r in (0.5, 0.75, 0.9)] + [("mask-flex", 0.75)]
]
_EVICT_LOGITS: dict[tuple[int, float], torch.Tensor] = {}


def prepare(model, length: int, mode: str, ratio: float):
    """Prefill under the press (still applied when this returns: mask mode needs it to decode);
    returns ``(rewind, decode_round, kept, exit_stack)``."""
    apply = mode.split("-")[0]
    press = None if mode == "full" else kc.make_press("chunkkv", compression_ratio=ratio, apply=apply)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(applied(press, model))
    cache = new_cache(model)
    model(prompt_ids(length), logits_to_keep=1, **{cache_keyword(model): cache})
    kept = cache.get_seq_length()
    # What the session recorded the compressed cache to stand for: a crop back to the prefill is
    # refused as a non-continuation (rightly, for users); this benchmark rewinds that record too.
    record = continuation_of(cache)
    feed = prompt_ids(length)[:, : STEPS + 1]  # any fixed tokens: every round does the same work
    positions = torch.arange(length, length + STEPS + 1)[None]

    def step(index: int):
        return model(feed[:, index:index + 1], position_ids=positions[:, index:index + 1], logits_to_keep=1,
                     **{cache_keyword(model): cache}).logits

    def rewind():
        """Untimed: back to the post-prefill cache plus one decoded token. The crop hands the
        layers new tensors, so a compressed layer's next step copies it once into a buffer with
        headroom (kvpress_chunk/hf/growing_layer.py); decoding pays that copy once per 16-256
        steps, not once per round, so it is made here. A full cache's layer concatenates at
        every step, as transformers does: that stays in the timed steps. (A negative count of
        tokens to drop: transformers >= 5.3 refuses a positive target length.)"""
        if cache.get_seq_length() > kept:  # (crop(0) would empty it)
            cache.crop(kept - cache.get_seq_length())
        if record is not None:
            setattr(cache, CONTINUATION_ATTR, record)
        step(0)

    def decode_round():
        for index in range(1, STEPS + 1):
            logits = step(index)
        return logits

    return rewind, decode_round, kept, stack


def evict_logits(model, length, ratio):
    if (length, ratio) not in _EVICT_LOGITS:
        rewind, decode_round, _, stack = prepare(model, length, "evict", ratio)
        with stack:
            rewind()
            _EVICT_LOGITS[(length, ratio)] = decode_round()
    return _EVICT_LOGITS[(length, ratio)]


@pytest.mark.parametrize("length,mode,ratio", CASES)
def test_decode(benchmark, length, mode, ratio, monkeypatch):
    from kvpress_chunk.modes.gathered import decode_kernel

    if mode == "mask-flex":
        monkeypatch.setenv("KVPRESS_CHUNK_MASK_DECODE", "flex")
    model, _ = smollm2()
    reference = evict_logits(model, length, ratio) if mode.startswith("mask") else None  # before the mask press is applied
    rewind, decode_round, kept, stack = prepare(model, length, mode, ratio)
    with stack:
        rewind()
        logits = decode_round()  # check, and warm-up (compiles flex in mask mode)
        if mode == "evict":
            assert kept == int(length * (1 - ratio))
            _EVICT_LOGITS[(length, ratio)] = logits
        elif mode.startswith("mask"):
            assert kept == length  # the cache stays whole
            torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
        label = "full cache" if mode == "full" else f"{mode}, {ratio:.0%} removed"
        if mode.startswith("mask"):
            label = f"mask ({decode_kernel(model.device)}), {ratio:.0%} removed"
        benchmark.group = f"decode, SmolLM2, {length}-token context, {STEPS} tokens per round"
        benchmark.extra_info.update(label=label, baseline=mode == "full", reading="throughput", tokens=STEPS,
                                    facts={"cached tokens": kept})
        benchmark.pedantic(decode_round, setup=rewind, rounds=5, iterations=1)

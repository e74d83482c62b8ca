"""Shared workloads of the model-level benchmarks: the embedded SmolLM2 and real prompts for it."""

from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch
from transformers import DynamicCache

import kvpress_chunk as kc
from kvpress_chunk.eval.tasks import make_case
from kvpress_chunk.generation import new_cache
from kvpress_chunk.generation import applied
from kvpress_chunk.hf.hooks import cache_argument, call_argument, find_attention_layers
from kvpress_chunk.policies import LayerInputs


#: Prompt length of the ``smoke_only`` stand-ins of the timed SmolLM2 prefills and decodes: the
#: same code paths and checks (exact budgets, kvpress parity, one layer alive at a time, mask ==
#: evict logits) as at 2k-8k, at a fraction of the normal test run's time.
SMOKE_LENGTH = 512


def smoke_only(*values, id: str | None = None):
    """A case for the normal test run only, smaller than the timed ones it stands in for: it
    checks the same code path in a fraction of the time (timed runs drop it, ``conftest.py``)."""
    return pytest.param(*values, marks=[pytest.mark.smoke, pytest.mark.smoke_only], id=id)


@functools.lru_cache(maxsize=1)
def smollm2():
    """The embedded SmolLM2-135M-Instruct, one copy for all benchmarks (skipped if not installed)."""
    from kvpress_chunk.hf.models import ModelNotInstalledError

    try:
        return kc.load_default_model()
    except ModelNotInstalledError as exc:
        pytest.skip(str(exc))


@functools.lru_cache(maxsize=8)
def prompt_ids(length: int) -> torch.Tensor:
    """``[1, length]`` token ids of a needle-in-a-haystack context (real text, not random ids)."""
    _, tokenizer = smollm2()
    case = make_case(tokenizer, "niah", context_tokens=length + 200, depth=0.5, seed=0)
    ids = tokenizer(case.context, return_tensors="pt", add_special_tokens=False).input_ids[:, :length]
    assert ids.shape[-1] == length, f"haystack too short: {ids.shape[-1]} < {length} tokens"
    return ids


def run_prefill(model, ids: torch.Tensor, press=None) -> DynamicCache:
    """One prefill from an empty cache, under ``press(model)`` when given (ours or kvpress')."""
    cache = new_cache(model)
    with torch.inference_mode(), applied(press, model):
        model(ids, past_key_values=cache, logits_to_keep=1)
    return cache


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by the cache's keys and values (layers not filled yet count 0)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if getattr(layer, "keys", None) is not None)


def capture_layer_inputs(model, ids: torch.Tensor) -> list[LayerInputs]:
    """What each attention layer hands the press during a plain prefill (hidden states, full
    keys/values, RoPE tables), so that the compression of all layers can be timed on its own."""
    captured: list[LayerInputs] = []

    def hook(module, args, kwargs, output):
        layer = cache_argument(args, kwargs).layers[module.layer_idx]
        hidden = call_argument(args, kwargs, "hidden_states", 0)
        valid = torch.ones(hidden.shape[:2], dtype=torch.bool)
        captured.append(LayerInputs(module, module.layer_idx, hidden, layer.keys, layer.values, valid,
                                    kwargs.get("position_embeddings")))

    handles = [module.register_forward_hook(hook, with_kwargs=True) for _, module in find_attention_layers(model)]
    try:
        run_prefill(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


class LiveCacheProbe:
    """Largest cache footprint seen while a prefill runs, read after every attention layer.

    Its hooks are registered before the press's, so at layer ``i`` they see layer ``i`` still
    uncompressed and layers ``< i`` already compressed: the true high-water mark of the cache.
    """

    def __init__(self, model):
        self.model = model
        self.peak = 0
        self._handles = []

    def _hook(self, module, args, kwargs, output):
        self.peak = max(self.peak, cache_bytes(cache_argument(args, kwargs)))

    def __enter__(self):
        self._handles = [module.register_forward_hook(self._hook, with_kwargs=True)
                         for _, module in find_attention_layers(self.model)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_rss_growth(fn: Callable[[], object]) -> tuple[int, object]:
    """``(bytes, result)``: how far the process's resident memory peaked above its level before
    ``fn`` ran. Linux only: resets the kernel's high-water mark (``/proc/self/clear_refs`` 5)
    and reads ``VmHWM``. It counts everything (activations, attention buffers, caches), which is
    what a user's machine has to hold. glibc keeps freed memory resident and reuses it, which
    would hide a peak below the level left by earlier work (seen here: 0 MB), so free memory
    is handed back to the system first (``malloc_trim``); differences of ~10 MB are noise."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError as exc:
        pytest.skip(f"peak memory needs Linux with glibc (malloc_trim, /proc/self/clear_refs): {exc}")
    before = _proc_status("VmRSS")
    result = fn()
    return _proc_status("VmHWM") - before, result

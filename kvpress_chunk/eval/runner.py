"""Run evaluation sweeps: cases x presses x ratios, for this library and (optionally) kvpress.

Both libraries' presses are context managers over the model (``with press(model):``), so one
runner drives both on the very same cases, prompts and decoding loop.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..generation import generate_answers
from ..spec import make_press
from .tasks import Case, score_answer

LIBRARY = "kvpress-chunk"


@dataclass(frozen=True)
class PressEntry:
    """A named press family: ``build(ratio)`` returns a press-like (``press(model)`` is a context manager)."""

    label: str
    library: str
    build: Callable[[float], Any]


def our_entries(names: Iterable[str], compile: bool = False) -> list[PressEntry]:
    """Entries for this library's presets (validated now, so typos fail before the long run)."""
    entries = []
    for name in names:
        make_press(name, compression_ratio=0.5)
        entries.append(PressEntry(name, LIBRARY, lambda r, n=name: make_press(n, compression_ratio=r, compile=compile)))
    return entries


def preset_of(name: str) -> str:
    """The preset a press name stands on (``kvzip(chunk_size=512)`` -> ``kvzip``): kvpress' twin
    of a parametrised name is its preset's, with kvpress' defaults."""
    return name.split("(", 1)[0].strip()


def kvpress_entries(names: Iterable[str]) -> list[PressEntry]:
    """kvpress' own presses under the names of ours (chunk length 10 for ChunkKV, as our preset;
    expected attention with AdaKV head budgets, as our preset). A parametrised name maps to the
    twin of its preset with kvpress' defaults (``kvzip(chunk_size=512)`` -> ``KVzipPress``), once.
    Names without a kvpress twin (``observed`` needs eager attention weights there; our
    combinations) are skipped."""
    import kvpress

    factories = {
        "chunkkv": lambda r: kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=r), chunk_length=10),
        "chunkkv-kvpress": lambda r: kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=r), chunk_length=20),
        "chunkkv-entropy": lambda r: kvpress.EntropyGatedChunkKVPress(kvpress.SnapKVPress(compression_ratio=r)),
        "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "streamingllm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
        "random": lambda r: kvpress.RandomPress(compression_ratio=r, seed=0),
        "kvzip": lambda r: kvpress.KVzipPress(compression_ratio=r),
        "expected-attention": lambda r: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=r)),
        "keydiff": lambda r: kvpress.KeyDiffPress(compression_ratio=r),
        "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
        "adakv": lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)),
        "pyramidkv": lambda r: kvpress.PyramidKVPress(compression_ratio=r),
    }
    entries: dict[str, PressEntry] = {}
    for name in names:
        base = preset_of(name)
        if base in factories and base not in entries:
            entries[base] = PressEntry(base, "kvpress", factories[base])
    return list(entries.values())


REFERENCE_LIBRARY = "kvpress"


def reference_failure(library: str, error: BaseException) -> dict[str, str]:
    """What a failed run records, ``{"error": "Type: message"}``, for kvpress' presses only: a
    press of the library we compare against that breaks on a case (its PyramidKV's per-layer
    lengths under transformers 5.2's decoding masks, its ChunkKV on Gemma 3's sliding layers) is
    listed under the tables and the sweep goes on, instead of losing every run done so far. Our
    own presses must never fail quietly: their errors (and anything but an ``Exception``, such as
    Ctrl-C) are raised again."""
    if library != REFERENCE_LIBRARY or not isinstance(error, Exception):
        raise error
    return {"error": f"{type(error).__name__}: {str(error)[:200]}"}


def completed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of runs that finished (failed runs carry ``error`` and no figures)."""
    return [r for r in results if "error" not in r]


def failures(records: list[dict[str, Any]]) -> dict[tuple[str, str, float], tuple[int, str]]:
    """``(library, press, ratio) -> (failed runs, first error)`` for the runs that recorded an
    error instead of figures (kvpress' presses only)."""
    failed: dict[tuple[str, str, float], tuple[int, str]] = {}
    for r in records:
        if "error" in r:
            key = (r["library"], r["press"], r["compression_ratio"])
            count, first = failed.get(key, (0, r["error"]))
            failed[key] = (count + 1, first)
    return failed


def failure_lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per (library, press, ratio) whose runs failed, with the first error: printed
    under a table so a failure is never mistaken for a missing row."""
    return [f"failed: {library} {press} at {ratio:.0%} removed, {count} run(s): {error}"
            for (library, press, ratio), (count, error) in sorted(failures(results).items(),
                                                                   key=lambda kv: (kv[0][1], kv[0][2], kv[0][0]))]


@torch.inference_mode()
def answer_case(model, tokenizer, case: Case, press, query_aware: bool, max_new_tokens: int) -> tuple[str, int]:
    """``(answer, kept cache tokens)`` for one case, through the library's own generation path
    (:func:`~kvpress_chunk.generation.generate_answers`). Query-agnostic: the context alone is
    prefilled (and compressed), then the question is fed. Query-aware: context and question are
    prefilled together, so the question sits in the observation window while compressing."""
    kept: list[int] = []
    (answer,) = generate_answers(
        model, tokenizer, case.context, case.question, press=press, max_new_tokens=max_new_tokens,
        query_aware=query_aware, on_prefill=lambda context: kept.append(int(context.kept_per_row()[0])),
    )
    return answer, kept[0]


def run_sweep(
    model,
    tokenizer,
    cases: list[Case],
    entries: list[PressEntry],
    ratios: list[float],
    query_aware: bool = False,
    max_new_tokens: int = 24,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every case with the full cache, then with every press at every ratio. One record per run."""
    from tqdm import tqdm

    runs = [(case, None, 0.0) for case in cases] + [(case, e, r) for case in cases for e in entries for r in ratios]
    results = []
    bar = tqdm(runs, desc="evaluating", unit="run", file=sys.stderr, disable=not progress)
    for case, entry, ratio in bar:
        label = "full" if entry is None else entry.label
        bar.set_postfix_str(f"{label} r={ratio} {case.target_tokens} tok", refresh=False)
        library = "-" if entry is None else entry.library
        press = None if entry is None else entry.build(ratio)
        start = time.perf_counter()
        try:
            answer, kept = answer_case(model, tokenizer, case, press, query_aware, max_new_tokens)
            figures = {"kept_tokens": kept, "answer": answer, "score": score_answer(answer, case.answers)}
        except Exception as error:  # noqa: BLE001 - reference_failure raises again unless it is kvpress'
            figures = reference_failure(library, error)
        results.append({
            **case.to_dict(), "library": library, "press": label, "compression_ratio": ratio, **figures,
            "seconds": round(time.perf_counter() - start, 3),
        })
    return results

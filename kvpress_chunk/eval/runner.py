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

from ..generation import applied, eos_token_ids, greedy_continue, prefill
from ..hf.models import chat_prompt_parts
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


def kvpress_entries(names: Iterable[str]) -> list[PressEntry]:
    """kvpress' own presses under the names of ours (chunk length 10 for ChunkKV, as our preset)."""
    import kvpress

    factories = {
        "chunkkv": lambda r: kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=r), chunk_length=10),
        "chunkkv-kvpress": lambda r: kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=r), chunk_length=20),
        "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "streamingllm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
        "random": lambda r: kvpress.RandomPress(compression_ratio=r, seed=0),
    }
    return [PressEntry(name, "kvpress", factories[name]) for name in names if name in factories]


def kept_tokens(model, context) -> int:
    """Real prefix tokens later forwards attend to (mask mode keeps the cache whole but masks it)."""
    return int(context.kept_per_row()[0])


@torch.inference_mode()
def answer_case(model, tokenizer, case: Case, press, query_aware: bool, max_new_tokens: int) -> tuple[str, int]:
    """``(answer, kept cache tokens)`` for one case. Query-agnostic: the context alone is
    prefilled (and compressed), then the question is fed. Query-aware: context and question are
    prefilled together, so the question sits in the observation window while compressing."""
    prefix, suffix = chat_prompt_parts(tokenizer) if getattr(tokenizer, "chat_template", None) else ("", "\n")
    eos = eos_token_ids(tokenizer, model)
    encode = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids  # noqa: E731
    with applied(press, model):
        if query_aware:
            context = prefill(model, encode(prefix + case.context + "\n\n" + case.question + suffix))
            kept = kept_tokens(model, context)
            first = context.last_logits.argmax(dim=-1, keepdim=True)
            rest = greedy_continue(model, context, first, max_new_tokens - 1, eos) if first.item() not in eos else first[:, :0]
            tokens = torch.cat([first, rest], dim=-1)
        else:
            context = prefill(model, encode(prefix + case.context))
            kept = kept_tokens(model, context)
            tokens = greedy_continue(model, context, encode("\n\n" + case.question + suffix), max_new_tokens, eos)
    return tokenizer.decode(tokens[0], skip_special_tokens=True).strip(), kept


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
        press = None if entry is None else entry.build(ratio)
        start = time.perf_counter()
        answer, kept = answer_case(model, tokenizer, case, press, query_aware, max_new_tokens)
        results.append(
            {
                **case.to_dict(),
                "library": "-" if entry is None else entry.library,
                "press": label,
                "compression_ratio": ratio,
                "kept_tokens": kept,
                "answer": answer,
                "score": score_answer(answer, case.answers),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    return results

"""Fidelity: how much does compressing a text change what the model predicts right after it?

A needle test is binary and needs many cases to separate two presses; fidelity is continuous and
cheap. For a window of the shipped prose, the first ``context_tokens`` are prefilled and
compressed (query-agnostic: nothing of what follows is seen), then the next
``continuation_tokens`` are fed teacher-forced in one forward. Against the full cache's run on the
same window, per press and ratio:

* ``nll``: mean negative log-likelihood of the true continuation (nats/token), ``delta_nll`` its
  increase over the full cache (0 is perfect, larger is worse);
* ``kl``: mean KL divergence from the full cache's next-token distribution to the compressed
  one's (nats/token);
* ``top1``: share of positions where both predict the same next token.

Any press-like object works (``press(model)`` is a context manager): ours and kvpress', on the
very same windows and forward. Windows are drawn from a seeded shuffle of the prose's sentences,
so a run is reproducible.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..generation import leading_special_ids, prefill, prompt_parts, teacher_forced_logits
from .runner import PressEntry, completed, failure_lines, reference_failure
from .tasks import prose_sentences


@dataclass(frozen=True)
class Window:
    """One fidelity case: ``context_ids[1, C]`` (chat prefix included) and ``continuation_ids[1, K]``."""

    index: int
    context_ids: torch.Tensor
    continuation_ids: torch.Tensor


def make_windows(
    tokenizer, context_tokens: int = 1000, continuation_tokens: int = 64, count: int = 4, seed: int = 0
) -> list[Window]:
    """``count`` windows of the shipped prose, each a fresh seeded shuffle of its sentences."""
    if context_tokens < 16 or continuation_tokens < 1 or count < 1:
        raise ValueError(
            f"need context_tokens >= 16, continuation_tokens >= 1 and count >= 1; got "
            f"{context_tokens}, {continuation_tokens}, {count}"
        )
    prefix, _ = prompt_parts(tokenizer)
    # As encode_context starts a context: the chat template's prefix, else the tokenizer's own
    # start (BOS). Without it a base model (Gemma 3) was measured on a context it never sees.
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else leading_special_ids(tokenizer)
    sentences = list(prose_sentences())
    windows = []
    for index in range(count):
        rng = random.Random(f"fidelity-{seed}-{index}")
        order = rng.sample(sentences, len(sentences))
        wanted = context_tokens + continuation_tokens
        text, ids = "", []
        for sentence in order:
            text = f"{text} {sentence}" if text else sentence
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) >= wanted:
                break
        if len(ids) < wanted:
            raise ValueError(f"the shipped prose has {len(ids)} tokens, fewer than the {wanted} a window needs")
        context = list(prefix_ids) + list(ids[:context_tokens])
        windows.append(Window(index, torch.tensor([context]), torch.tensor([ids[context_tokens:wanted]])))
    return windows


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, window: Window, press=None) -> tuple[torch.Tensor, int]:
    """``(log-probabilities [K, V] of each continuation position, kept cache tokens)``."""
    context = prefill(model, window.context_ids, press=press, tokenizer=tokenizer)
    kept = int(context.kept_per_row()[0])
    continuation = window.continuation_ids.to(model.device)
    first = context.last_logits.float()  # before teacher forcing moves it past the continuation
    later = teacher_forced_logits(model, context, continuation[:, :-1])  # [1, K-1, V]
    logits = torch.cat([first[:, None], later], dim=1)[0]
    return torch.log_softmax(logits, dim=-1), kept


def compare(full: torch.Tensor, compressed: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Fidelity figures of ``compressed`` log-probabilities against ``full`` ones ``[K, V]``."""
    nll = -compressed.gather(-1, targets[:, None]).mean()
    full_nll = -full.gather(-1, targets[:, None]).mean()
    kl = (full.exp() * (full - compressed)).sum(dim=-1).mean()
    top1 = (full.argmax(dim=-1) == compressed.argmax(dim=-1)).float().mean()
    return {
        "nll": round(float(nll), 5), "delta_nll": round(float(nll - full_nll), 5),
        "kl": round(float(kl.clamp(min=0)), 5), "top1": round(float(top1), 4),
    }


def run_fidelity(
    model, tokenizer, windows: list[Window], entries: Iterable[PressEntry], ratios: list[float], progress: bool = True
) -> list[dict[str, Any]]:
    """Every window with the full cache, then with every press at every ratio; one record per run
    (the full cache's records have ``delta_nll == 0`` and ``kl == 0`` by definition)."""
    from tqdm import tqdm

    entries = list(entries)
    # References are keyed by the window's place in the list: windows of two context lengths share
    # their indices (make_windows numbers each length's from 0), and keyed by index, every press
    # run on the first length was compared with the last length's full-cache predictions.
    runs = [(i, w, None, 0.0) for i, w in enumerate(windows)]
    runs += [(i, w, e, r) for i, w in enumerate(windows) for e in entries for r in ratios]
    references: dict[int, torch.Tensor] = {}
    results = []
    bar = tqdm(runs, desc="fidelity", unit="run", file=sys.stderr, disable=not progress)
    for place, window, entry, ratio in bar:
        label = "full" if entry is None else entry.label
        bar.set_postfix_str(f"{label} r={ratio}", refresh=False)
        library = "-" if entry is None else entry.library
        press = None if entry is None else entry.build(ratio)  # built before the clock: `seconds` is the run's
        start = time.perf_counter()
        try:
            logprobs, kept = continuation_logprobs(model, tokenizer, window, press)
            if entry is None:
                references[place] = logprobs
            figures = {"kept_tokens": kept,
                       **compare(references[place], logprobs, window.continuation_ids[0].to(logprobs.device))}
        except Exception as error:  # noqa: BLE001 - reference_failure raises again unless it is kvpress'
            figures = reference_failure(library, error)
        results.append({
            "task": "fidelity", "window": window.index, "context_tokens": int(window.context_ids.shape[-1]),
            "continuation_tokens": int(window.continuation_ids.shape[-1]),
            "library": library, "press": label, "compression_ratio": ratio,
            **figures, "seconds": round(time.perf_counter() - start, 3),
        })
    return results


def format_fidelity_table(results: list[dict[str, Any]]) -> str:
    """Mean figures per (press, ratio), full cache first: a markdown table, then a line per
    (press, ratio) whose runs failed (kvpress' presses only; see :func:`.runner.reference_failure`)."""
    groups: dict[tuple, list[dict]] = {}
    for record in completed(results):
        groups.setdefault((record["library"], record["press"], record["compression_ratio"]), []).append(record)
    lines = [
        "| library | press | removed | windows | NLL | ΔNLL vs full | KL to full | top-1 agree | s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    for (library, press, ratio), rows in sorted(groups.items(), key=lambda kv: (kv[0][1] != "full", kv[0][2], kv[0][0], kv[0][1])):
        lines.append(
            f"| {library} | {press} | {ratio:.0%} | {len(rows)} | {mean(rows, 'nll'):.3f} | {mean(rows, 'delta_nll'):+.3f} | "
            f"{mean(rows, 'kl'):.3f} | {mean(rows, 'top1'):.1%} | {mean(rows, 'seconds'):.1f} |"
        )
    failures = failure_lines(results)
    return "\n".join(lines + ([""] + failures if failures else []))

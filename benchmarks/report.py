"""Render a saved benchmark run as the Markdown table of ``docs/benchmarks.md``.

    pytest benchmarks --benchmark-only --benchmark-json=run.json
    python benchmarks/report.py run.json                              # print it
    python benchmarks/report.py run.json --update docs/benchmarks.md  # replace the marked table

The header names the machine, the versions and the date of the run (from the JSON itself);
each group shows its cases with the ratio to the group's baseline measured in the same run
(see :mod:`ratios`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ratios import format_table, records_from_json  # noqa: E402


def header(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    versions = machine.get("kvpress_chunk_versions", {})
    lines = [
        f"* date: {data.get('datetime', '?')[:16].replace('T', ' ')} UTC",
        f"* machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
        f"{machine.get('system', '?')} {machine.get('release', '')}".rstrip(),
        f"* python {machine.get('python_version', '?')}, "
        + ", ".join(f"{name} {version}" for name, version in versions.items()),
    ]
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"* commit: {commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}")
    if machine.get("kvpress_chunk_note"):  # how a run was put together (e.g. groups re-run), said where it is read
        lines.append(f"* note: {machine['kvpress_chunk_note']}")
    return "\n".join(lines)


START, END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"


def update(document: Path, table: str) -> None:
    """Replace the text between the table markers of ``document`` (nothing else is touched)."""
    text = document.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{document} has no {START} ... {END} markers to put the table between")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    document.write_text(f"{before}{START}\n{table}\n{END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a --benchmark-json file")
    parser.add_argument("--update", type=Path, metavar="DOC", help="write the table into DOC between its markers")
    args = parser.parse_args(argv)
    if not args.run.is_file():
        parser.error(f"{args.run} does not exist; make one with: pytest benchmarks --benchmark-only --benchmark-json={args.run}")
    data = json.loads(args.run.read_text())
    table = f"{header(data)}\n\n{format_table(records_from_json(data), markdown=True)}"
    if args.update:
        update(args.update, table)
        print(f"table of {args.run} written into {args.update}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark report: ratios to each group's baseline, and the docs table writer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import ratios  # noqa: E402
import report  # noqa: E402


def bench(group, name, median, **extra):
    return {"group": group, "name": name, "stats": {"median": median, "rounds": 3}, "extra_info": extra}


RUN = {
    "datetime": "2026-11-24T13:00:00.000000",
    "machine_info": {"cpu": {"brand_raw": "Some CPU", "count": 2}, "system": "Linux", "python_version": "3.11.7",
                     "kvpress_chunk_versions": {"torch": "2.13.0"}},
    "benchmarks": [
        bench("op", "test_op[kvpress]", 0.010, label="kvpress", baseline=True),
        bench("op", "test_op[ours]", 0.002, label="ours"),
        bench("op", "test_op[slow]", 0.020, label="slow"),
        bench("prefill", "test_prefill[none]", 4.0, label="plain", baseline=True, reading="overhead"),
        bench("prefill", "test_prefill[press]", 4.2, label="press", reading="overhead", facts={"cache MB": "23.6"}),
        bench("layers", "test_layers[x]", 0.2, label="all layers", share_of="prefill"),
        bench("decode", "test_decode[full]", 0.8, label="full", baseline=True, reading="throughput", tokens=8),
        bench("decode", "test_decode[evict]", 0.4, label="evict", reading="throughput", tokens=8),
        bench("lonely", "test_lonely[a]", 1.0),
    ],
}


def table_of(run):
    return {case: (versus, facts) for _, rows in ratios.rows(ratios.records_from_json(run)) for case, _, versus, facts in rows}


def test_each_reading_compares_with_its_group_baseline():
    table = table_of(RUN)
    assert table["kvpress"][0] == "baseline"
    assert table["ours"][0] == "5.00x faster" and table["slow"][0] == "2.00x slower"
    assert table["press"] == ("+5.0%", "cache MB 23.6")
    assert table["all layers"][1] == "= 5.0% of plain"  # a share of another group's baseline
    assert table["evict"] == ("2.00x tokens/s", "tokens/s 20.0")
    assert table["a"][0] == "(no baseline in this run)"  # never a ratio against nothing


def test_a_note_on_how_the_run_was_made_is_printed_in_the_header():
    run = {**RUN, "machine_info": {**RUN["machine_info"], "kvpress_chunk_note": "group x re-run"}}
    assert "* note: group x re-run" in report.header(run)
    assert "note" not in report.header(RUN)


def test_tail_rate_is_compared_with_the_baseline_tail():
    run = {**RUN, "benchmarks": [
        bench("gen", "t[full]", 10.0, label="full", baseline=True, reading="throughput", tokens=100,
              tail={"tokens": 25, "seconds": 4.0}),
        bench("gen", "t[M]", 8.0, label="M", reading="throughput", tokens=100, tail={"tokens": 25, "seconds": 2.0}),
        bench("gen", "t[other]", 8.0, label="other tail", reading="throughput", tokens=100,
              tail={"tokens": 50, "seconds": 2.0}),
    ]}
    table = table_of(run)
    assert table["full"][1] == "tokens/s 10.0, last 25 tokens 6.2 tokens/s"
    assert table["M"] == ("1.25x tokens/s", "tokens/s 12.5, last 25 tokens 12.5 tokens/s = 2.00x")
    assert table["other tail"][1] == "tokens/s 12.5, last 50 tokens 25.0 tokens/s"  # different tails: no ratio


def test_report_writes_between_the_markers_only(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(RUN))
    doc = tmp_path / "bench.md"
    doc.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")
    assert report.main([str(run), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "| ours | 2.00 ms | 5.00x faster |" in text and "Some CPU, 2 cores" in text and "torch 2.13.0" in text


def test_report_refuses_a_document_without_markers_and_a_missing_run(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(RUN))
    doc = tmp_path / "bench.md"
    doc.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="markers"):
        report.main([str(run), "--update", str(doc)])
    assert doc.read_text() == "no markers here\n"
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json")])

"""The benchmark report: ratios to each group's baseline, and the docs table writer."""

from __future__ import annotations

import json
import os
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


# --- machine load: figures timed on a busy machine are flagged ---------------------------------

import machine_load  # noqa: E402

PROC_STAT_TEXT = """cpu  1000 10 200 5000 40 5 5 40 0 0
cpu0 500 5 100 2500 20 2 3 20 0 0
intr 12345
"""


def test_proc_stat_parsing_counts_steal_as_busy_and_iowait_as_idle():
    busy, total = machine_load.parse_proc_stat(PROC_STAT_TEXT)
    assert busy == 1000 + 10 + 200 + 5 + 5 + 40
    assert total == busy + 5000 + 40
    with pytest.raises(ValueError):
        machine_load.parse_proc_stat("intr 1\n")


def test_others_share_is_the_machines_busy_time_minus_our_own():
    before = machine_load.CpuSnapshot(busy_ticks=1000, total_ticks=3000, own_seconds=1.0)
    # 200 ticks passed on all CPUs; 150 busy, of which our process used 0.5 s = 50 ticks at 100 Hz
    after = machine_load.CpuSnapshot(busy_ticks=1150, total_ticks=3200, own_seconds=1.5)
    assert machine_load.others_share(before, after, 100.0) == pytest.approx(0.5)
    # our own time above the machine's (rounding of two clocks) reads as an idle machine, not < 0
    alone = machine_load.CpuSnapshot(busy_ticks=1040, total_ticks=3200, own_seconds=1.5)
    assert machine_load.others_share(before, alone, 100.0) == 0.0
    assert machine_load.others_share(before, before, 100.0) is None  # no time passed: no figure


@pytest.mark.skipif(not machine_load.PROC_STAT.exists(), reason="/proc/stat only exists on Linux")
def test_a_busy_child_process_reads_as_other_load():
    import subprocess
    import time

    ticks = machine_load.ticks_per_second()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # the child is running, not waited: its time is not ours
        before = machine_load.snapshot()
        time.sleep(1.0)
        after = machine_load.snapshot()
    finally:
        child.wait()
    share = machine_load.others_share(before, after, ticks)
    # one core of os.cpu_count() busy with the child; allow for the scheduler and other load
    assert share is not None and share >= 0.5 / (os.cpu_count() or 1)


def test_report_flags_cases_timed_on_a_busy_machine():
    run = {**RUN, "benchmarks": [
        bench("op", "test_op[kvpress]", 0.010, label="kvpress", baseline=True, others_cpu_share=0.02),
        bench("op", "test_op[ours]", 0.002, label="ours", others_cpu_share=0.45, facts={"kept": 512}),
    ]}
    table = table_of(run)
    assert table["kvpress"][1] == ""  # 2%: an idle machine, no flag
    assert table["ours"][1] == "machine busy: 45% of the CPU to other processes, kept 512"
    text = ratios.format_table(ratios.records_from_json(run))
    assert text.splitlines()[-1].startswith("WARNING: 1 of 2 cases were timed while other processes used the machine")
    assert ratios.format_table(ratios.records_from_json(RUN)).count("WARNING") == 0  # no figure, no flag

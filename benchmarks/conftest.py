"""Benchmark settings: full timed runs on demand, a once-each smoke subset in the normal test run.

* ``pytest benchmarks --benchmark-only`` (or ``--benchmark-enable``): every case, timed.
* ``python -m pytest`` (the README's test command, which collects ``benchmarks/`` too): only the
  cases marked ``smoke``, each run once with timing disabled, so the benchmarks never rot but
  CI passes no judgement on speed (timed assertions are flaky on shared machines). Where the
  timed lengths would make that run slow, a smaller case marked ``smoke_only`` stands in for them
  (:func:`workloads.smoke_only`): the test run keeps it, timed runs drop it.

Ratios against the baseline measured *in the same run* (full cache, kvpress, prefill without a
press) are printed at the end of a timed run; :mod:`ratios` computes them, and
``python benchmarks/report.py run.json`` renders the same table from a saved run.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
import torch._dynamo

import machine_load
from ratios import format_table, records_from_session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A compiled policy that silently fell back to eager would time the wrong thing.
torch._dynamo.config.fail_on_recompile_limit_hit = True


def timed_run(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only") or config.getoption("benchmark_enable"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "smoke: benchmark case also run (once, untimed) by the normal test run")
    config.addinivalue_line("markers", "smoke_only: a small stand-in case for the normal test run; timed runs drop it")
    if not timed_run(config):
        # Runs before pytest-benchmark reads the option: the fixture then calls each function once.
        config.option.benchmark_disable = True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    if timed_run(config):
        dropped = [item for item in items if item.get_closest_marker("smoke_only") is not None]
    else:
        dropped = [item for item in items if str(item.path).startswith(here) and item.get_closest_marker("smoke") is None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        dropped_set = set(dropped)
        items[:] = [item for item in items if item not in dropped_set]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not timed_run(config) or not session.benchmarks:
        return
    terminalreporter.write_sep("=", "ratios to the baseline of each group (same run)")
    terminalreporter.write_line(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                                f"{torch.get_num_threads()} threads")
    terminalreporter.write_line(format_table(records_from_session(session.benchmarks)))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Versions that move the figures, saved in every JSON run (``report.py`` prints them)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "kvpress", "kvpress-chunk"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    versions["threads"] = str(torch.get_num_threads())
    machine_info["kvpress_chunk_versions"] = versions


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _record_machine_load(request: pytest.FixtureRequest):
    """In a timed run, record in each case's ``extra_info`` the share of the machine's CPU that
    other processes used while pytest-benchmark ran it (calibration, warm-up and rounds; not the
    case's setup), so the report can flag figures taken on a busy machine (``machine_load``)."""
    if "benchmark" not in request.fixturenames or not timed_run(request.config):
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    ticks = machine_load.ticks_per_second()

    def measured(run):
        def wrapper(*args, **kwargs):
            before = machine_load.snapshot()
            try:
                return run(*args, **kwargs)
            finally:
                after = machine_load.snapshot()
                if before is not None and after is not None:
                    share = machine_load.others_share(before, after, ticks)
                    if share is not None:
                        benchmark.extra_info["others_cpu_share"] = round(share, 3)
        return wrapper

    # Instance attributes shadow the methods that __call__ and pedantic() call.
    benchmark._raw = measured(benchmark._raw)
    benchmark._raw_pedantic = measured(benchmark._raw_pedantic)
    yield

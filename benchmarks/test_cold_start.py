"""Cold start: what a fresh process pays for its first compiled calls.

Each round runs ``benchmarks/cold_start.py`` in a new Python process: import, then the first
call of the fused compression op (``chunkkv``, SmolLM2's layer shape, 1024 tokens) and the first
mask-mode decoding step through compiled FlexAttention, each including its compilation. Three
cases, the process time read against the eager process in the same run:

* eager: no compilation at all (the op's plain cost, the floor of a fresh process);
* cold compile cache: an empty ``TORCHINDUCTOR_CACHE_DIR`` per round (first run on a machine);
* warm compile cache: the same directory for every round, filled by an untimed first process
  (torch's FX graph and AOTAutograd caches, plus :mod:`kvpress_chunk.compile.cache`'s record
  that spares later processes inductor's vector-ISA probe).

The figures to read are the facts: seconds in the first op call and in the first flex step.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CASES = {
    "eager": "eager op, fresh process (no compilation)",
    "cold": "compiled, cold compile cache",
    "warm": "compiled, warm compile cache",
}


def fresh_process(mode: str, cache_dir: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, str(HERE / "cold_start.py"), mode], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.smoke) if c == "eager" else c for c in CASES])
def test_first_calls_of_a_fresh_process(benchmark, case, tmp_path_factory):
    mode = "eager" if case == "eager" else "compiled"
    shared = tmp_path_factory.mktemp("inductor-cache")
    if case == "warm":
        fresh_process(mode, shared)  # fills the cache, untimed
    seen: list[dict] = []

    def one_process():
        seen.append(fresh_process(mode, tmp_path_factory.mktemp("inductor-cold") if case == "cold" else shared))

    benchmark.group = "first calls of a fresh process (chunkkv op at 1024 tokens, then one flex decoding step)"
    benchmark.pedantic(one_process, rounds=1 if case == "cold" else 3, iterations=1)
    first_op = statistics.median(r["op"] for r in seen)
    first_flex = statistics.median(r["flex"] for r in seen)
    facts = {"first op call": f"{first_op:.2f} s"}
    if mode == "compiled":
        facts["first flex step"] = f"{first_flex:.2f} s"
    facts["import"] = f"{statistics.median(r['import'] for r in seen):.2f} s"
    benchmark.extra_info.update(label=CASES[case], baseline=case == "eager", reading="speedup", facts=facts)

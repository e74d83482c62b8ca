"""compile/cache.py: inductor's vector-ISA build checks run once per machine and cache
directory; later processes pick the same ISA without them. Fresh processes: the probe's results
are cached per process by inductor itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from torch._inductor import config, cpu_vec_isa
calls = []
original = cpu_vec_isa.VecISA.check_build
def counted(self, code):
    calls.append(str(self))
    return original(self, code)
cpu_vec_isa.VecISA.check_build = counted
from kvpress_chunk.compile.cache import prepare_inductor, _vec_isa_key
prepare_inductor()
isa = str(cpu_vec_isa.pick_vec_isa())
print(json.dumps({"probes": len(calls), "vec_isa_ok": config.cpp.vec_isa_ok, "isa": isa, "key": _vec_isa_key()}))
"""


def run(cache_dir, **env):
    environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), **env)
    environment["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_probe_runs_once_per_cache_directory_then_is_read_from_it(tmp_path):
    first = run(tmp_path / "a")
    if first["key"] is None:
        pytest.skip("the probe is only memoised on x86-64 Linux")
    assert first["probes"] >= 1 and first["vec_isa_ok"] is None  # inductor's config untouched
    # the memo lives in the given cache directory (a fresh one probed above, so no other place
    # answered for it; a third process on another directory, 10 s of CI, showed the same)
    assert any((tmp_path / "a" / "kvpress_chunk").iterdir())
    second = run(tmp_path / "a")
    assert second == {**first, "probes": 0}  # same ISA picked, nothing built or loaded

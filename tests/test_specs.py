"""Specs, registry, presets and the errors users see for bad input."""

import pytest

import kvpress_chunk as kc
from kvpress_chunk.budget import Budget, BudgetError
from kvpress_chunk.policies import ChunkGrouper, ReuseEvery, SnapKVScorer, TopKSelector
from kvpress_chunk.registry import SpecError, build_part, parse_call


def test_the_three_spec_forms_build_the_same_press():
    as_dict = kc.make_press(
        {
            "scorer": {"name": "snapkv", "window": 32},
            "grouper": {"name": "chunk", "size": 10},
            "selector": "topk",
            "planner": {"name": "reuse", "every": 2},
            "compression_ratio": 0.75,
        }
    )
    as_strings = kc.make_press(
        {"scorer": "snapkv(window=32)", "grouper": "chunk(size=10)", "planner": "reuse(every=2)", "compression_ratio": 0.75}
    )
    assert as_dict == as_strings
    assert as_dict.scorer == SnapKVScorer(window=32)
    assert as_dict.grouper == ChunkGrouper(size=10)
    assert as_dict.planner == ReuseEvery(every=2)
    assert as_dict.compression_ratio == 0.75


def test_toml_file_spec(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(
        'compression_ratio = 0.5\nscorer = "knorm"\n[grouper]\nname = "chunk"\nsize = 4\n[planner]\nname = "reuse"\nevery = 3\n'
    )
    press = kc.make_press(path)
    assert press.grouper == ChunkGrouper(size=4)
    assert press.planner == ReuseEvery(every=3)
    assert press.compression_ratio == 0.5
    # A preset can be the base of a file spec, and keyword overrides still apply.
    path.write_text('preset = "chunkkv"\nbudget = 64\n[params]\nchunk_size = 5\n')
    press = kc.make_press(str(path), compile=False)
    assert press.grouper.size == 5 and press.budget == 64 and press.compile is False


def test_presets_listed_with_docs_and_buildable():
    presets = kc.list_presets()
    assert {"chunkkv", "chunkkv-kvpress", "snapkv", "streamingllm", "knorm", "random"} <= set(presets)
    for name, doc in presets.items():
        assert doc, f"preset {name} has no one-line doc"
        press = kc.make_press(name, compression_ratio=0.5)
        assert press.name == name


def test_preset_parameters_inline_and_as_keywords():
    inline = kc.make_press("chunkkv(chunk_size=20, reuse_every=2)", budget=128)
    keywords = kc.make_press("chunkkv", chunk_size=20, reuse_every=2, budget=128)
    assert inline == keywords
    assert inline.grouper.size == 20 and inline.planner == ReuseEvery(2) and inline.budget == 128


def test_chunkkv_preset_is_paper_algorithm_1():
    press = kc.make_press("chunkkv", compression_ratio=0.9)
    assert press.grouper == ChunkGrouper(size=10, reduce="sum")
    assert isinstance(press.scorer, SnapKVScorer)
    assert press.selector == TopKSelector(keep_window=True, fill="exact")


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_ratio_outside_range_is_refused(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        kc.make_press("chunkkv", compression_ratio=ratio)


def test_both_or_neither_ratio_and_budget_refused():
    with pytest.raises(ValueError, match="exactly one"):
        kc.make_press({"scorer": "knorm", "compression_ratio": 0.5, "budget": 10})
    with pytest.raises(ValueError, match="exactly one"):
        kc.make_press("chunkkv")
    with pytest.raises(BudgetError):
        Budget()
    with pytest.raises(ValueError, match="budget"):
        kc.make_press("chunkkv", budget=0)


def test_override_replaces_the_other_budget_form():
    press = kc.make_press({"scorer": "knorm", "compression_ratio": 0.5}, budget=12)
    assert press.budget == 12 and press.compression_ratio is None
    assert press.replace(compression_ratio=0.25).budget is None


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_chunk_size_below_one_refused(size):
    with pytest.raises(SpecError, match="chunk size"):
        kc.make_press({"scorer": "knorm", "grouper": {"name": "chunk", "size": size}, "compression_ratio": 0.5})
    with pytest.raises(SpecError, match="chunk[ _]size"):  # 2.5 is refused by the preset's type check
        kc.make_press("chunkkv", chunk_size=size, compression_ratio=0.5)


def test_unknown_names_list_the_valid_ones():
    valid_presets = ", ".join(sorted(kc.list_presets()))
    with pytest.raises(SpecError, match=rf"unknown preset 'chunky'; valid presets: {valid_presets}$"):
        kc.make_press("chunky", compression_ratio=0.5)
    valid_scorers = ", ".join(sorted(kc.registered("scorer")))
    with pytest.raises(SpecError, match=rf"unknown scorer 'h2o'; valid scorers: {valid_scorers}$"):
        kc.make_press({"scorer": "h2o", "compression_ratio": 0.5})
    with pytest.raises(SpecError, match=r"unknown planner 'pyramid'; valid planners: every_layer, reuse"):
        kc.make_press({"scorer": "knorm", "planner": "pyramid", "compression_ratio": 0.5})


def test_unknown_keys_name_the_part_and_its_valid_keys():
    with pytest.raises(SpecError, match=r"grouper 'chunk' has no setting 'length'; valid keys: size, reduce"):
        kc.make_press({"scorer": "knorm", "grouper": {"name": "chunk", "length": 4}, "compression_ratio": 0.5})
    with pytest.raises(SpecError, match=r"preset 'chunkkv' has no parameter 'chunk_length'; valid parameters: chunk_size"):
        kc.make_press("chunkkv", chunk_length=4, compression_ratio=0.5)
    with pytest.raises(SpecError, match=r"unknown press spec key\(s\) \['scorers'\]"):
        kc.make_press({"scorers": "knorm", "compression_ratio": 0.5})
    with pytest.raises(SpecError, match="spec file"):
        kc.make_press("missing.toml")


def test_parse_call_reads_literals_and_bare_words():
    assert parse_call("chunk(size=10, reduce=sum)") == ("chunk", {"size": 10, "reduce": "sum"})
    assert parse_call("topk(per_head=True, sinks=4)") == ("topk", {"per_head": True, "sinks": 4})
    with pytest.raises(SpecError):
        parse_call("chunk(10)")
    with pytest.raises(SpecError):
        parse_call("chunk(size=")


def test_register_a_new_part_and_use_it_by_name():
    from dataclasses import dataclass

    import torch

    from kvpress_chunk.policies import Scorer

    @kc.register("scorer", "value-norm-test")
    @dataclass(frozen=True)
    class ValueNormScorer(Scorer):
        def score(self, keys, valid):
            return torch.zeros(keys.shape[:-1])

    press = kc.make_press({"scorer": "value-norm-test", "grouper": "chunk(size=4)", "compression_ratio": 0.5})
    assert isinstance(press.scorer, ValueNormScorer)
    assert "value-norm-test" in kc.registered("scorer")
    with pytest.raises(SpecError, match="already registered"):
        kc.register("scorer", "value-norm-test")(SnapKVScorer)


def test_invalid_part_settings_are_spec_errors():
    with pytest.raises(SpecError, match="kernel"):
        build_part("scorer", "snapkv(kernel=4)")
    with pytest.raises(SpecError, match="per_head=True needs"):
        build_part("selector", "topk(per_head=True, fill='whole')")
    with pytest.raises(SpecError, match="every"):
        build_part("planner", "reuse(every=0)")
    with pytest.raises(SpecError, match="count='groups' needs"):
        kc.make_press("chunkkv-kvpress", budget=10)


@pytest.mark.parametrize("name", sorted(kc.list_presets()))
def test_every_preset_describes_itself(name):
    press = kc.make_press(name, compression_ratio=0.5)
    text = press.describe()
    assert text.startswith(f"{name}: scorer=") and "compression_ratio=0.5" in text and f"apply={press.apply}" in text
    assert "budget=64" in kc.make_press("snapkv", budget=64).describe()


def test_compile_defaults_to_auto_eager_on_cpu_compiled_on_accelerators():
    press = kc.make_press("chunkkv", compression_ratio=0.5)
    assert press.compile == "auto" and not press.compiles_on("cpu") and press.compiles_on("cuda")
    assert kc.make_press("chunkkv", compression_ratio=0.5, compile=True).compiles_on("cpu")
    with pytest.raises(SpecError, match="compile must be True, False or 'auto'"):
        kc.make_press("chunkkv", compression_ratio=0.5, compile="yes")


def test_parse_call_reads_bare_booleans_as_booleans():
    # 'per_head=false' was kept as the string 'false', which a part reads as True (setting flipped)
    assert parse_call("knorm(per_head=false, x=True, y=none, reduce=sum)") == (
        "knorm", {"per_head": False, "x": True, "y": None, "reduce": "sum"}
    )
    assert kc.make_press("knorm(per_head=false)", compression_ratio=0.5).selector.per_head is False

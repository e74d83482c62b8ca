"""Invalid part and preset settings fail when the press is built (``make_press``), with a message
naming the part (or preset), the setting, the value and what is expected, instead of being
silently reinterpreted (``reuse_every=0`` as every-layer selection, ``spiky_keep=2.5`` as 3,
``size=True`` as 1) or failing deep inside torch at the first prefill (``window=2.5``)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvpress_chunk as kc
from kvpress_chunk.policies import EveryLayer, ReuseEvery
from kvpress_chunk.policies.presets import preset_parameters
from kvpress_chunk.policies.selectors import EntropyGatedSelector
from kvpress_chunk.registry import PART_KINDS, SpecError, build_part, registered

RATIO = {"compression_ratio": 0.5}


def press_with(kind: str, spec) -> kc.Press:
    """A press around one part (the others defaults that accept it)."""
    parts = {"scorer": "knorm", kind: spec, **RATIO}
    if kind == "selector" and "adaptive" in str(spec):
        parts["apply"] = "mask"  # head-adaptive selection keeps different counts per head
    if kind == "allocator":
        parts["selector"] = "topk(per_head=True)"
    return kc.make_press(parts)


# -- the reported findings ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -5, True, False, 2.0, "2", None])
def test_chunkkv_reuse_every_must_be_an_int_at_least_one(value):
    # 0, -5 and True all became every-layer selection (the preset only tested reuse_every > 1).
    with pytest.raises(SpecError, match=rf"preset 'chunkkv': reuse_every must be an int.*got {value!r}"):
        kc.make_press("chunkkv", reuse_every=value, **RATIO)
    with pytest.raises(SpecError, match="reuse_every"):
        kc.make_press(f"chunkkv(reuse_every={value!r})", **RATIO)


def test_chunkkv_reuse_every_valid_values_keep_their_meaning():
    assert kc.make_press("chunkkv(reuse_every=1)", **RATIO).planner == EveryLayer()
    assert kc.make_press("chunkkv", reuse_every=3, **RATIO).planner == ReuseEvery(every=3)


@pytest.mark.parametrize("value", [2.5, 3.0, True, "3", 0, -1])
def test_spiky_keep_must_be_an_int_at_least_one(value):
    # 2.5 acted as 3 (the gate compares integer ranks with it).
    with pytest.raises(SpecError, match=rf"selector 'entropy-gated': spiky_keep must be an int >= 1.*got {value!r}"):
        build_part("selector", {"name": "entropy-gated", "spiky_keep": value})
    with pytest.raises(SpecError, match="spiky_keep"):
        kc.make_press("chunkkv-entropy", spiky_keep=value, **RATIO)
    with pytest.raises(ValueError, match="spiky_keep"):  # direct construction too
        EntropyGatedSelector(spiky_keep=value)


@pytest.mark.parametrize(
    "kind, spec, setting",
    [
        ("grouper", "chunk(size=True)", "size"),
        ("selector", "topk(sinks=True)", "sinks"),
        ("planner", "reuse(every=True)", "every"),
        ("scorer", "observed(queries=True)", "queries"),
        ("scorer", "kvzip(sinks=True)", "sinks"),
        ("scorer", "expected-attention(future=True)", "future"),
        ("grouper", "sentence(max_size=True)", "max_size"),
    ],
)
def test_a_bool_is_not_an_int_setting(kind, spec, setting):
    with pytest.raises(SpecError, match=rf"{kind} '[\w-]+': {setting} must be an int.*got True \(bool\)"):
        press_with(kind, spec)


@pytest.mark.parametrize(
    "kind, spec, setting",
    [
        ("scorer", "snapkv(window=2.5)", "window"),
        ("scorer", "snapkv(kernel=5.0)", "kernel"),
        ("scorer", "random(seed=1.5)", "seed"),
        ("scorer", "observed(queries=16.0)", "queries"),
        ("scorer", "expected-attention(future=64.5)", "future"),
        ("scorer", "kvzip(window=2.5)", "window"),
        ("grouper", "chunk(size=4.0)", "size"),
        ("selector", "topk(sinks=1.5)", "sinks"),
    ],
)
def test_float_settings_fail_at_construction_not_at_prefill(kind, spec, setting):
    with pytest.raises(SpecError, match=rf"{kind} '[\w-]+': {setting} must be an int.*\(float\)"):
        press_with(kind, spec)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_random_seed_must_fit_the_generator(seed):
    with pytest.raises(SpecError, match=r"scorer 'random': seed must be an int in"):
        build_part("scorer", {"name": "random", "seed": seed})
    assert build_part("scorer", "random(seed=-5)").seed == -5  # negative seeds are fine for torch


def test_tova_window_is_the_last_token():
    # The score is the last token's attention whatever `window` says; another window would
    # silently protect or pass through tokens the scorer never observed.
    with pytest.raises(SpecError, match=r"scorer 'tova': window must be 1 .*got 8"):
        build_part("scorer", "tova(window=8)")
    assert build_part("scorer", "tova(window=1)").window == 1


@pytest.mark.parametrize("ids", ["13", 13, [1.5], [True], [-1], ("a",), {13: 1}])
def test_sentence_boundary_ids_must_be_token_ids(ids):
    # "13" was read as the ids 1 and 3; 1.5 as 1.
    with pytest.raises(SpecError, match=r"grouper 'sentence': boundary_ids must be None or a list of token ids"):
        build_part("grouper", {"name": "sentence", "boundary_ids": ids})
    assert build_part("grouper", {"name": "sentence", "boundary_ids": [13, np.int64(7)]}).boundary_ids == (13, 7)
    assert build_part("grouper", {"name": "sentence", "boundary_ids": np.array([4, 2])}).boundary_ids == (4, 2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, True, "0.1"])
def test_expected_attention_epsilon_is_a_finite_non_negative_number(value):
    with pytest.raises(SpecError, match=r"scorer 'expected-attention': epsilon must be a finite number >= 0"):
        build_part("scorer", {"name": "expected-attention", "epsilon": value})


def test_messages_name_part_setting_value_and_expectation():
    with pytest.raises(SpecError) as info:
        build_part("selector", "entropy-gated(spiky_keep=2.5)")
    assert str(info.value) == (
        "selector 'entropy-gated': spiky_keep must be an int >= 1 (tokens a spiky group keeps), got 2.5 (float)"
    )
    with pytest.raises(SpecError) as info:
        kc.make_press("chunkkv", chunk_size=0, **RATIO)
    assert str(info.value) == (
        "grouper 'chunk': size must be an int >= 1 (the chunk size in tokens), got 0 (building preset 'chunkkv')"
    )
    with pytest.raises(SpecError) as info:
        kc.make_press("kvzip(plus='yes')", **RATIO)
    assert str(info.value) == "preset 'kvzip': plus must be True or False, got 'yes' (str)"


# -- every registered part, every setting ----------------------------------------------------------

#: wrong values per field annotation: each must be refused, whatever the field
WRONG = {
    "int": [True, False, 2.5, "3", None, [1]],
    "bool": [1, 0, "false", "yes", None],
    "str": [1, None, True, "no-such-choice"],
    "float": [True, "0.1", None, float("nan"), float("inf")],
    "tuple[int, ...] | None": ["13", 13, [2.5], [True]],
}

#: int settings with just a lower bound: (kind, part, setting) -> smallest valid value
MINIMUM = {
    ("scorer", "snapkv", "window"): 1,
    ("scorer", "observed", "queries"): 0,
    ("scorer", "expected-attention", "future"): 1,
    ("scorer", "expected-attention", "sinks"): 0,
    ("scorer", "kvzip", "chunk_size"): 9,
    ("scorer", "kvzip", "window"): 0,
    ("scorer", "kvzip", "sinks"): 0,
    ("scorer", "kvzip", "pool"): 0,
    ("scorer", "kvzip", "observe"): 0,
    ("grouper", "chunk", "size"): 1,
    ("grouper", "sentence", "max_size"): 1,
    ("selector", "topk", "sinks"): 0,
    ("selector", "entropy-gated", "sinks"): 0,
    ("selector", "entropy-gated", "spiky_keep"): 1,
    ("selector", "adaptive", "sinks"): 0,
    ("planner", "reuse", "every"): 1,
}
#: int settings with another rule (tested on their own above or below)
SPECIAL_INTS = {("scorer", "snapkv", "kernel"), ("scorer", "random", "seed"), ("scorer", "tova", "window")}
#: (kind, name, setting) left out of the sweep below (none: every setting has a rule)
NOT_COVERED: set = set()


def settings_of_registered_parts():
    for kind in PART_KINDS:
        for name, cls in sorted(registered(kind).items()):
            for field in dataclasses.fields(cls):
                if field.init and (kind, name, field.name) not in NOT_COVERED:
                    yield kind, name, field.name, str(field.type)


ALL_SETTINGS = list(settings_of_registered_parts())


def test_every_int_setting_has_a_known_rule():
    """A new int setting must say its range here (and check it in its part's __post_init__)."""
    ints = {(kind, name, setting) for kind, name, setting, annotation in ALL_SETTINGS if annotation == "int"}
    assert ints == set(MINIMUM) | SPECIAL_INTS
    assert {annotation for *_, annotation in ALL_SETTINGS} <= set(WRONG)


@pytest.mark.parametrize("kind, name, setting, annotation", ALL_SETTINGS)
def test_every_setting_of_every_part_refuses_wrong_values(kind, name, setting, annotation):
    build_part(kind, name)  # the defaults are valid
    for value in WRONG[annotation]:
        with pytest.raises(SpecError) as info:
            build_part(kind, {"name": name, setting: value})
        message = str(info.value)
        assert message.startswith(f"{kind} {name!r}: {setting} must be "), message
        if not isinstance(value, float) or math.isfinite(value):
            assert f"got {value!r}" in message, message


@pytest.mark.parametrize("key", sorted(MINIMUM), ids="-".join)
@given(value=st.integers(min_value=-1000, max_value=100_000))
def test_int_settings_take_exactly_the_ints_in_range(key, value):
    kind, name, setting = key
    if value >= MINIMUM[key]:
        part = build_part(kind, {"name": name, setting: value})
        assert getattr(part, setting) == value and type(getattr(part, setting)) is int
    else:
        with pytest.raises(SpecError, match=rf"^{kind} '{name}': {setting} must be an int >= {MINIMUM[key]}\b"):
            build_part(kind, {"name": name, setting: value})


@given(kernel=st.integers(min_value=-50, max_value=500))
def test_snapkv_kernel_is_a_positive_odd_int(kernel):
    if kernel >= 1 and kernel % 2 == 1:
        assert build_part("scorer", {"name": "snapkv", "kernel": kernel}).kernel == kernel
    else:
        with pytest.raises(SpecError, match=r"^scorer 'snapkv': kernel must be"):
            build_part("scorer", {"name": "snapkv", "kernel": kernel})


def test_numpy_ints_are_ints_and_numbers_floats_and_round_trip():
    # np.int64(2) was refused by some parts (isinstance int) and kept as np.int64 by others.
    assert kc.make_press("chunkkv", reuse_every=np.int64(2), **RATIO).planner == ReuseEvery(every=2)
    press = kc.make_press({"scorer": "expected-attention(epsilon=0)", "selector": "topk(per_head=true)", **RATIO})
    assert press.scorer.epsilon == 0.0 and type(press.scorer.epsilon) is float
    press = kc.make_press(
        {"scorer": {"name": "snapkv", "window": np.int64(16)}, "grouper": {"name": "chunk", "size": np.int32(4)},
         "planner": {"name": "reuse", "every": np.int64(2)}, **RATIO}
    )
    assert type(press.scorer.window) is int and type(press.grouper.size) is int and type(press.planner.every) is int
    assert kc.make_press(press.to_spec()) == press
    with pytest.raises(SpecError, match=r"grouper 'chunk': size must be an int"):
        build_part("grouper", {"name": "chunk", "size": np.float64(4.0)})


# -- every preset, every typed parameter ------------------------------------------------------------

PRESET_TYPES = {"int": int, "bool": bool, "float": float}


def typed_preset_parameters():
    import inspect

    from kvpress_chunk.policies.presets import _PRESETS

    for name in sorted(kc.list_presets()):
        for parameter in inspect.signature(_PRESETS[name]).parameters.values():
            if parameter.annotation in PRESET_TYPES:
                yield name, parameter.name, parameter.annotation


@pytest.mark.parametrize("name, parameter, annotation", list(typed_preset_parameters()))
def test_every_typed_preset_parameter_refuses_wrong_types(name, parameter, annotation):
    for value in WRONG[annotation]:
        if isinstance(value, float) and not math.isfinite(value):
            continue
        with pytest.raises(SpecError) as info:
            kc.make_press(name, **{parameter: value}, **RATIO)
        message = str(info.value)
        assert message.startswith(f"preset {name!r}: {parameter} must be "), message
        assert f"got {value!r}" in message, message
    default = preset_parameters(name)[parameter]
    kc.make_press(name, **{parameter: default}, **RATIO)  # the default stays valid


def test_valid_specs_still_build_and_round_trip():
    specs = [
        "chunkkv(chunk_size=20, reuse_every=2, sinks=4, per_head=True, reduce='max')",
        "observed(queries=0)",
        "kvzip(recent=8, pool=2, observe=16, aligned=True, allocator='uniform')",
        "chunkkv-kvzip(chunk_size=8, allocator='global', plus=True)",
        "expected-attention(chunk_size=4, allocator='uniform')",
        "pyramidkv(spread=0)",
        "random(seed=-3)",
        "streamingllm(sinks=0)",
        "chunkkv-entropy(spiky_keep=1)",
    ]
    for spec in specs:
        press = kc.make_press(spec, **RATIO)
        assert kc.make_press(press.to_spec()) == press, spec

"""Press specs: a preset name, a dict, a ``"name(k=v)"`` string or a TOML file -> :class:`Press`.

The inverse is :meth:`Press.to_spec`; ``make_press(press.to_spec()) == press`` for every preset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .press import PART_BASES, PRESS_KEYS, Press
from .registry import PART_KINDS, SettingError, SpecError, build_part


def load_spec_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a press spec from a TOML file (top-level keys as in the dict form)."""
    import tomllib

    with open(path, "rb") as handle:
        try:
            return tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"press spec file {str(path)!r} is not valid TOML: {exc}") from None


def make_press(spec: Any = "chunkkv", **overrides: Any) -> Press:
    """Build a :class:`Press` from a preset name, a spec dict, a ``"name(k=v)"`` string or a TOML file.

    >>> make_press("chunkkv", compression_ratio=0.75)
    >>> make_press("chunkkv(chunk_size=20, reuse_every=2)", budget=256)
    >>> make_press({"scorer": {"name": "snapkv", "window": 32}, "grouper": "chunk(size=10)",
    ...             "selector": "topk", "planner": {"name": "reuse", "every": 2},
    ...             "compression_ratio": 0.75})
    >>> make_press("my_policy.toml")

    Keyword arguments override the spec: ``compression_ratio``, ``budget`` and ``compile`` apply
    to the press; other keywords are preset parameters (for a preset) or rejected.
    """
    from .policies.presets import preset_spec

    if isinstance(spec, Press):
        press_changes = {k: overrides.pop(k) for k in list(overrides) if k in PRESS_KEYS}
        if overrides:
            raise SpecError(f"unknown press setting(s) {sorted(overrides)}; valid: {', '.join(PRESS_KEYS)}")
        return spec.replace(**press_changes) if press_changes else spec
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".toml"):
        if not Path(spec).is_file():
            raise SpecError(f"press spec file {str(spec)!r} does not exist")
        spec = load_spec_file(spec)
    name = "custom"
    from_preset = None  # the preset the spec comes from, if any (named in a part's setting error)
    if isinstance(spec, str):
        preset_params = {k: v for k, v in overrides.items() if k not in PRESS_KEYS}
        overrides = {k: v for k, v in overrides.items() if k in PRESS_KEYS}
        name, spec = preset_spec(spec, preset_params)
        from_preset = name
    if not isinstance(spec, dict):
        raise SpecError(f"a press spec must be a preset name, a dict or a .toml path, got {type(spec).__name__}")
    spec = dict(spec)
    if "preset" in spec:
        preset = spec.pop("preset")
        params = spec.pop("params", {})
        name, base = preset_spec(preset, params)
        from_preset = name
        base.update(spec)
        spec = base
    unknown_overrides = sorted(set(overrides) - set(PRESS_KEYS))
    if unknown_overrides:
        raise SpecError(
            f"unknown press setting(s) {unknown_overrides}; valid: {', '.join(PRESS_KEYS)} "
            "(preset parameters are accepted only with a preset name)"
        )
    spec.update(overrides)
    if "compression_ratio" in overrides or "budget" in overrides:
        # An explicit override replaces the spec's budget form instead of clashing with it.
        for key in ("compression_ratio", "budget"):
            if key not in overrides:
                spec.pop(key, None)
    allowed = set(PART_KINDS) | set(PRESS_KEYS) | {"name"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpecError(f"unknown press spec key(s) {unknown}; valid keys: {', '.join(sorted(allowed))}")
    defaults = {"grouper": "token", "selector": "topk", "planner": "every_layer", "allocator": "uniform"}
    if "scorer" not in spec:
        raise SpecError("a press spec needs a 'scorer' (e.g. 'snapkv', 'knorm'); see list_presets() for ready ones")
    try:
        parts = {kind: build_part(kind, spec.get(kind, defaults.get(kind)), PART_BASES[kind]) for kind in PART_KINDS}
    except SettingError as exc:
        if from_preset is None:
            raise
        # make_press("chunkkv", chunk_size=0) fails in the chunk grouper's `size`: say where it came from.
        raise SettingError(f"{exc} (building preset {from_preset!r})") from None
    if "compression_ratio" not in spec and "budget" not in spec:
        raise SpecError("give exactly one of compression_ratio (fraction removed, in [0, 1)) or budget (tokens kept)")
    try:
        return Press(
            **parts,
            compression_ratio=spec.get("compression_ratio"),
            budget=spec.get("budget"),
            compile=spec.get("compile", "auto"),
            apply=spec.get("apply", "evict"),
            name=spec.get("name", name),
            decoding=spec.get("decoding"),
        )
    except ValueError as exc:
        raise SpecError(str(exc)) from None

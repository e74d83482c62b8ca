"""Checks for the settings of parts and presets, run when they are built (not at prefill).

Every part's ``__post_init__`` checks its fields with these helpers, so an invalid setting is a
:class:`~kvpress_chunk.registry.SettingError` (a ``SpecError``) at ``make_press`` whose message
names the part, the setting, the value and what is expected, instead of a value silently
reinterpreted (``spiky_keep=2.5`` acting as 3, ``size=True`` as 1) or a failure deep inside torch
at the first prefill (``window=2.5``).

Types are strict: an ``int`` setting takes an integer (``numbers.Integral``, so NumPy integers
too, normalised to ``int``) but not a bool, although ``bool`` is an ``int`` subclass; a number
setting takes an ``int`` or a ``float`` (finite, normalised to ``float``) but not a bool; a
``bool`` setting takes ``True`` or ``False`` only (not ``1``, not ``"yes"``).

The ``check_*`` helpers read a field of a (frozen) part, check it and store the normalised value;
the ``require_*`` helpers check a bare value under any label (preset parameters).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable, NoReturn

from ..registry import SettingError


def part_label(part: Any) -> str:
    """``"grouper 'chunk'"`` for a registered part (its class's own registration), else the class name."""
    cls = type(part)
    name = cls.__dict__.get("registered_name")
    if name is None:
        return cls.__name__
    return f"{cls.__dict__.get('registered_kind', 'part')} {name!r}"


def _got(value: Any, wrong_type: bool) -> str:
    return f"{value!r} ({type(value).__name__})" if wrong_type else repr(value)


def refuse(label: str, name: str, value: Any, expected: str, wrong_type: bool = False) -> NoReturn:
    """Raise the one error format: ``"<label>: <name> must be <expected>, got <value>"``."""
    raise SettingError(f"{label}: {name} must be {expected}, got {_got(value, wrong_type)}")


def _bounds(minimum: Any, maximum: Any, below: Any = None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None and below is not None:
        return f" in [{minimum}, {below})"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    if below is not None:
        return f" < {below}"
    return ""


def _meaning(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""


def require_int(
    label: str, name: str, value: Any, minimum: int | None = None, maximum: int | None = None, meaning: str = ""
) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) within ``[minimum, maximum]``."""
    expected = f"an int{_bounds(minimum, maximum)}{_meaning(meaning)}"
    if isinstance(value, bool) or not isinstance(value, Integral):
        refuse(label, name, value, expected, wrong_type=True)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        refuse(label, name, value, expected)
    return value


def require_number(
    label: str,
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    meaning: str = "",
) -> float:
    """``value`` as a finite ``float`` (an int or a float, not a bool) in ``[minimum, maximum]``
    (or ``[minimum, below)``)."""
    expected = f"a finite number{_bounds(minimum, maximum, below)}{_meaning(meaning)}"
    if isinstance(value, bool) or not isinstance(value, Real):
        refuse(label, name, value, expected, wrong_type=True)
    value = float(value)
    if (
        not math.isfinite(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
        or (below is not None and value >= below)
    ):
        refuse(label, name, value, expected)
    return value


def require_bool(label: str, name: str, value: Any, meaning: str = "") -> bool:
    """``value`` if it is ``True`` or ``False`` (``1`` and ``"false"`` are refused: both read as true)."""
    if not isinstance(value, bool):
        refuse(label, name, value, f"True or False{_meaning(meaning)}", wrong_type=True)
    return value


def require_choice(label: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        refuse(label, name, value, f"one of {', '.join(map(repr, choices))}", wrong_type=not isinstance(value, str))
    return value


def _store(part: Any, name: str, value: Any) -> None:
    object.__setattr__(part, name, value)  # parts are frozen dataclasses


def check_int(part: Any, name: str, minimum: int | None = None, maximum: int | None = None, meaning: str = "") -> int:
    """Check (and normalise to ``int``) the int field ``name`` of ``part``."""
    value = require_int(part_label(part), name, getattr(part, name), minimum, maximum, meaning)
    _store(part, name, value)
    return value


def check_number(
    part: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    meaning: str = "",
) -> float:
    """Check (and normalise to ``float``) the number field ``name`` of ``part``."""
    value = require_number(part_label(part), name, getattr(part, name), minimum, maximum, below, meaning)
    _store(part, name, value)
    return value


def check_bool(part: Any, name: str, meaning: str = "") -> bool:
    """Check the bool field ``name`` of ``part``."""
    return require_bool(part_label(part), name, getattr(part, name), meaning)


def check_choice(part: Any, name: str, choices: Iterable[Any]) -> Any:
    """Check that the field ``name`` of ``part`` is one of ``choices``."""
    return require_choice(part_label(part), name, getattr(part, name), choices)


def refuse_setting(part: Any, name: str, expected: str) -> NoReturn:
    """Refuse the field ``name`` of ``part`` (a rule the typed helpers do not express)."""
    refuse(part_label(part), name, getattr(part, name), expected)

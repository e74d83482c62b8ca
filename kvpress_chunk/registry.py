"""Name -> part registry and declarative part specs.

Every policy part (scorer, grouper, selector, planner) is a frozen dataclass registered under a
short name. A *spec* names a part and its settings in one of three interchangeable forms, so that
a policy can live in code, in a config file or on a command line:

* a dict: ``{"name": "chunk", "size": 10}``
* a string: ``"chunk(size=10)"`` or just ``"chunk"`` (values are Python literals)
* an already-built part instance (passed through unchanged)

Why a registry rather than imports: researchers add a part with one decorator and immediately use
it by name in every spec form, the CLI and TOML files, without touching library code.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Callable, TypeVar

PART_KINDS = ("scorer", "grouper", "selector", "allocator", "planner")

T = TypeVar("T")


class SpecError(ValueError):
    """A spec names an unknown part, carries an unknown key or an invalid value."""


class SettingError(SpecError):
    """An invalid setting of a part or a preset, refused when it is built. Its message already
    names the part (or preset), the setting, the value and what is expected (see
    :mod:`kvpress_chunk.policies.validation`)."""


_PARTS: dict[str, dict[str, type]] = {kind: {} for kind in PART_KINDS}


def register(kind: str, name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator registering a part dataclass under ``name`` for ``kind``.

    >>> @register("scorer", "my-scorer")
    ... @dataclass(frozen=True)
    ... class MyScorer(Scorer): ...
    """
    if kind not in _PARTS:
        raise SpecError(f"unknown part kind {kind!r}; valid kinds: {', '.join(PART_KINDS)}")

    def decorator(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass to be registered as a {kind}")
        existing = _PARTS[kind].get(name)
        if existing is not None and existing is not cls:
            raise SpecError(f"{kind} {name!r} is already registered by {existing.__qualname__}")
        _PARTS[kind][name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]
        cls.registered_kind = kind  # type: ignore[attr-defined]
        return cls

    return decorator


F = TypeVar("F", bound=Callable[..., Any])


def function_registrar(table: dict[str, F], kind: str) -> Callable[[str], Callable[[F], F]]:
    """``@registrar("name")`` decorators for named functions (presets, evaluation tasks): one rule
    for every function table, re-registering the same function is fine, another one is an error."""

    def register_as(name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in table and table[name] is not fn:
                raise SpecError(f"{kind} {name!r} is already registered")
            table[name] = fn
            return fn

        return decorator

    return register_as


def registered(kind: str) -> dict[str, type]:
    """A copy of the ``name -> class`` table for one part kind."""
    if kind not in _PARTS:
        raise SpecError(f"unknown part kind {kind!r}; valid kinds: {', '.join(PART_KINDS)}")
    return dict(_PARTS[kind])


_CALL_RE = re.compile(r"^\s*([A-Za-z_][\w\-\.]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


# bare words read as Python values in spec strings (case-insensitive)
BARE_LITERALS: dict[str, Any] = {"true": True, "false": False, "none": None}


def parse_call(text: str) -> tuple[str, dict[str, Any]]:
    """Parse ``"name(key=value, ...)"`` into ``(name, {key: value})``; values are Python literals."""
    match = _CALL_RE.match(text)
    if match is None:
        raise SpecError(f"cannot parse spec {text!r}; expected 'name' or 'name(key=value, ...)'")
    name, args = match.group(1), match.group(2)
    if not args or not args.strip():
        return name, {}
    try:
        call = ast.parse(f"f({args})", mode="eval").body
    except SyntaxError as exc:
        raise SpecError(f"cannot parse arguments of spec {text!r}: {exc.msg}") from None
    assert isinstance(call, ast.Call)
    if call.args:
        raise SpecError(f"spec {text!r}: arguments must be given as key=value")
    params: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise SpecError(f"spec {text!r}: '**' is not allowed")
        try:
            params[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            # A bare word (e.g. reduce=sum) is read as a string for command-line comfort; the
            # lower-case words of a bool or None are read as those (``per_head=false`` was kept as
            # the string 'false', which every part read as True: the setting silently flipped).
            if isinstance(keyword.value, ast.Name):
                word = keyword.value.id
                params[keyword.arg] = BARE_LITERALS.get(word.lower(), word)
            else:
                raise SpecError(
                    f"spec {text!r}: value of {keyword.arg!r} must be a literal (number, string, bool, None)"
                ) from None
    return name, params



def spec_to_name_and_params(kind: str, spec: Any) -> tuple[str, dict[str, Any]]:
    """Normalise a dict or string spec to ``(name, params)``."""
    if isinstance(spec, str):
        return parse_call(spec)
    if isinstance(spec, dict):
        if "name" not in spec:
            raise SpecError(f"{kind} spec {spec!r} has no 'name' key")
        params = dict(spec)
        return str(params.pop("name")), params
    raise SpecError(f"a {kind} spec must be a dict, a string or a {kind} instance, got {type(spec).__name__}")


def valid_keys(cls: type) -> list[str]:
    """Constructor keys accepted by a part dataclass."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def build_part(kind: str, spec: Any, base: type | None = None) -> Any:
    """Build a registered part from a spec (instance, dict or string).

    ``base`` is the abstract class of the kind: an instance of it is returned unchanged.
    """
    if base is not None and isinstance(spec, base):
        return spec
    name, params = spec_to_name_and_params(kind, spec)
    table = _PARTS[kind]
    if name not in table:
        raise SpecError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(table))}")
    cls = table[name]
    keys = valid_keys(cls)
    unknown = sorted(set(params) - set(keys))
    if unknown:
        raise SpecError(
            f"{kind} {name!r} has no setting {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(keys) if keys else '(none)'}"
        )
    try:
        return cls(**params)
    except SettingError:
        raise  # already names the part
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{kind} {name!r}: {exc}") from None


def part_name(part: Any) -> str:
    """The name a part instance was registered under (its class name if it never was): what
    specs and error messages call it, e.g. ``'global'`` rather than ``GlobalAllocator``."""
    return getattr(type(part), "registered_name", type(part).__name__)


def describe_part(part: Any) -> str:
    """``name(key=value, ...)`` for a part instance: the inverse of :func:`parse_call`."""
    name = part_name(part)
    args = ", ".join(f"{f.name}={getattr(part, f.name)!r}" for f in dataclasses.fields(part) if f.init)
    return f"{name}({args})"

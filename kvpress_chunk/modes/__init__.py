"""Apply modes: what happens to a layer's cache once its :class:`~kvpress_chunk.selection.Selection`
is known. One small strategy object per mode, registered by name (``Press(apply=name)``):

* ``evict`` (:mod:`.evict`): gather the kept tokens into a smaller cache (memory saved);
* ``mask`` (:mod:`.mask`): keep the cache whole, attend through a FlexAttention block mask.

Either way the layer hands back a :class:`~.routing.LayerView`: what later queries may see of
its cache. :mod:`.routing` makes every later forward honour it (``generate``, pipelines, our own
loop), so adding a mode is one file defining :class:`ApplyMode` plus ``@register_mode``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from ..registry import SpecError
from ..selection import Selection
from .routing import LayerView

M = TypeVar("M", bound="ApplyMode")


class ApplyMode:
    """Strategy interface. ``holds_ragged_heads``: can it keep different token counts per KV head?"""

    name: str = ""
    holds_ragged_heads: bool = False

    def apply(self, layer: Any, selection: Selection, kept_keys: torch.Tensor, kept_values: torch.Tensor) -> LayerView:
        """Change the cache layer (or not) and return the view later queries attend through."""
        raise NotImplementedError


_MODES: dict[str, ApplyMode] = {}


def register_mode(cls: type[M]) -> type[M]:
    """Class decorator: register an :class:`ApplyMode` under its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    _MODES[cls.name] = cls()
    return cls


def get_mode(name: str) -> ApplyMode:
    if name not in _MODES:
        raise SpecError(f"apply must be one of {', '.join(_MODES)}, got {name!r}")
    return _MODES[name]


def mode_names() -> tuple[str, ...]:
    return tuple(_MODES)


from . import evict, mask  # noqa: E402,F401  (registers the built-in modes, in this order)

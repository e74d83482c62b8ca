"""The fused compression op: score -> group -> select -> gather, eager and compiled.

One pure function (:func:`compress_eager`) defines the semantics; :func:`compiled_compress`
returns the same function compiled with ``torch.compile(fullgraph=True, dynamic=True)``:

* ``fullgraph=True`` makes a graph break an error instead of a silent slow path;
* ``dynamic=True`` from the first call, so prompts of new lengths reuse one graph instead of
  recompiling per length (and never reach dynamo's recompile limit);
* each part configuration gets its *own code object* (a renamed copy of the template), so
  dynamo's per-code-object recompile budget is not shared between the many policies a process
  may build (tests, sweeps): policy A's graphs never push policy B to the eager fallback.
"""

from __future__ import annotations

import threading
import types
from typing import Any, Callable

import torch

from ..budget import kept_counts
from ..policies.groupers import Grouper
from ..policies.scorers import Scorer
from ..policies.selectors import SelectionRequest, Selector
from ..selection import gather_kv
from .cache import prepare_inductor

CompressFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def compress_eager(
    scorer: Scorer,
    grouper: Grouper,
    selector: Selector,
    budget_kind: str,
    pool_heads: bool,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    extra: dict[str, torch.Tensor],
    capacity: int,
    budget_value: torch.Tensor,
    group_extra: dict[str, torch.Tensor] | None = None,
    pool_floor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference semantics. Returns ``(keys, values, indices, slot_valid)`` with ``capacity`` slots.

    ``budget_kind`` ("ratio" / "budget") and ``pool_heads`` (the allocator pools the heads'
    budgets) and ``pool_floor`` (each pooled head's guaranteed share) are static; ``budget_value`` is a tensor (data: 0-d for the press rule, ``[B]`` for
    an allocator's per-row layer budget)."""
    scores = scorer.score(keys, valid, **extra)
    group_ids = grouper.group_ids(valid, **(group_extra or {}))
    num_groups = grouper.num_groups(keys.shape[-2])

    def keep(counts: torch.Tensor) -> torch.Tensor:
        return kept_counts(budget_kind, budget_value, counts)

    request = SelectionRequest(scores, group_ids, num_groups, valid, scorer.window, keep, grouper.reduce, capacity, pool_heads,
                               pool_floor)
    selection = selector.select(request)
    kept_keys, kept_values = gather_kv(keys, values, selection.indices)
    return kept_keys, kept_values, selection.indices, selection.slot_valid


def _bind(
    scorer: Scorer, grouper: Grouper, selector: Selector, budget_kind: str, pool_heads: bool, pool_floor: float = 0.0
) -> CompressFn:
    def compress(keys, values, valid, extra, capacity, budget_value, group_extra=None):
        return compress_eager(
            scorer, grouper, selector, budget_kind, pool_heads, keys, values, valid, extra, capacity, budget_value,
            group_extra, pool_floor,
        )

    return compress


def eager_compress(
    scorer: Scorer, grouper: Grouper, selector: Selector, budget_kind: str, pool_heads: bool = False,
    pool_floor: float = 0.0,
) -> CompressFn:
    """The eager twin: same signature as :func:`compiled_compress`'s result."""
    return _bind(scorer, grouper, selector, budget_kind, pool_heads, pool_floor)


_COMPILED: dict[Any, CompressFn] = {}
_LOCK = threading.Lock()


def compiled_compress(
    scorer: Scorer, grouper: Grouper, selector: Selector, budget_kind: str, pool_heads: bool = False,
    pool_floor: float = 0.0,
) -> CompressFn:
    """The compiled op for one part configuration (memoised: same config, same graphs).

    The budget's *value* is not part of the key: ratios 0.5 and 0.9 share graphs."""
    key = (scorer, grouper, selector, budget_kind, pool_heads, pool_floor)
    prepare_inductor()
    with _LOCK:
        fn = _COMPILED.get(key)
        if fn is None:
            bound = _bind(scorer, grouper, selector, budget_kind, pool_heads, pool_floor)
            own_code = bound.__code__.replace(co_name=f"compress_{len(_COMPILED)}")
            fresh = types.FunctionType(own_code, bound.__globals__, own_code.co_name, bound.__defaults__, bound.__closure__)
            fn = torch.compile(fresh, fullgraph=True, dynamic=True)
            _COMPILED[key] = fn
        return fn

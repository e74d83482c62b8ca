"""Presets: named, documented recipes composed from registered parts.

A preset is a function of keyword parameters returning a spec dict; ``make_press("name(k=v)")``
or ``make_press("name", k=v, compression_ratio=...)`` builds it. Register your own with
``@preset("name")``; its docstring's first line is what :func:`list_presets` shows.

Parameters annotated ``int``, ``float`` or ``bool`` are type-checked before the preset runs
(:func:`checked_parameters`): ``reuse_every=True`` or ``chunk_size=1.0`` would otherwise pass
tests such as ``reuse_every > 1`` or ``chunk_size == 1`` as if they were ints. Ranges are the
parts' business (each part checks its own settings when it is built), apart from the parameters a
preset reads itself.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ..registry import SpecError, function_registrar, parse_call
from .validation import require_bool, require_int, require_number

PresetFn = Callable[..., dict[str, Any]]
_PRESETS: dict[str, PresetFn] = {}


def preset(name: str) -> Callable[[PresetFn], PresetFn]:
    """Decorator registering a preset function under ``name``."""
    return function_registrar(_PRESETS, "preset")(name)


def list_presets() -> dict[str, str]:
    """``name -> one-line description`` of every registered preset."""
    return {name: (inspect.getdoc(fn) or "").splitlines()[0] for name, fn in sorted(_PRESETS.items())}


def preset_parameters(name: str) -> dict[str, Any]:
    """Parameters of a preset and their defaults."""
    return {p.name: p.default for p in inspect.signature(_PRESETS[name]).parameters.values()}


def preset_spec(text: str, params: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``("chunkkv(chunk_size=20)", {...})`` -> ``(name, spec dict)`` with parameters checked."""
    name, inline = parse_call(text)
    if name not in _PRESETS:
        raise SpecError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(_PRESETS))}")
    merged = {**inline, **(params or {})}
    valid = preset_parameters(name)
    unknown = sorted(set(merged) - set(valid))
    if unknown:
        raise SpecError(
            f"preset {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid) or '(none)'} (plus compression_ratio, budget, compile)"
        )
    spec = _PRESETS[name](**checked_parameters(name, merged))
    spec.setdefault("name", name)
    return name, spec


_TYPE_CHECKS = {"int": require_int, "float": require_number, "bool": require_bool}


def checked_parameters(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` of preset ``name``, those annotated ``int``, ``float`` or ``bool`` checked
    (and normalised) by :mod:`.validation` (a :class:`~kvpress_chunk.registry.SettingError`
    naming the preset, the parameter and the value). Other annotations are not checked here."""
    signature = inspect.signature(_PRESETS[name])
    checked = dict(params)
    for key, value in params.items():
        parameter = signature.parameters.get(key)
        check = _TYPE_CHECKS.get(_type_name(parameter.annotation)) if parameter is not None else None
        if check is not None:
            checked[key] = check(f"preset {name!r}", key, value)
    return checked


def _type_name(annotation: Any) -> str | None:
    """``"int"`` for ``int`` or the postponed annotation ``"int"`` (``from __future__ import annotations``)."""
    if isinstance(annotation, str):
        return annotation.strip()
    return next((t.__name__ for t in (int, float, bool) if annotation is t), None)


@preset("chunkkv")
def chunkkv(
    chunk_size: int = 10,
    window: int = 32,
    kernel: int = 5,
    reuse_every: int = 1,
    sinks: int = 0,
    per_head: bool = False,
    reduce: str = "sum",
) -> dict[str, Any]:
    """ChunkKV (arXiv 2502.00299, Alg. 1): SnapKV-scored chunks of 10, window kept, exact budget.

    The observation window is always kept; the rest of the budget goes to the chunks with the
    highest summed scores, in original order; the last admitted chunk is cut to fit the budget
    exactly. ``reuse_every=2`` adds the paper's layer-wise index reuse (Alg. 2).
    """
    # Read here (not by a part): 0, -5 or True silently meant every-layer selection.
    reuse_every = require_int("preset 'chunkkv'", "reuse_every", reuse_every, minimum=1,
                              meaning="layers sharing one selection; 1: every layer selects")
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel},
        "grouper": {"name": "chunk", "size": chunk_size, "reduce": reduce},
        "selector": {"name": "topk", "per_head": per_head, "sinks": sinks, "keep_window": True},
        "planner": {"name": "reuse", "every": reuse_every} if reuse_every > 1 else "every_layer",
    }


@preset("chunkkv-kvpress")
def chunkkv_kvpress(chunk_length: int = 20, window: int = 64, kernel: int = 5) -> dict[str, Any]:
    """kvpress' ChunkKVPress(SnapKVPress(r), chunk_length=c), reproduced token for token.

    Window scored max+1 instead of protected; chunk score = mean; ``max(1, int(n_chunks * (1 - r)))``
    whole chunks kept, the partial tail chunk included; one selection shared by all heads. Unlike
    kvpress it is vectorised and handles every batch row (kvpress uses row 0's chunks for all).
    """
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel, "window_scores": "max+1"},
        "grouper": {"name": "chunk", "size": chunk_length, "reduce": "mean"},
        "selector": {"name": "topk", "keep_window": False, "count": "groups"},
        "planner": "every_layer",
    }


@preset("snapkv")
def snapkv(window: int = 64, kernel: int = 5, per_head: bool = True) -> dict[str, Any]:
    """SnapKV (arXiv 2404.14469): token-level top-k on observation-window attention, per KV head."""
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel},
        "grouper": "token",
        "selector": {"name": "topk", "per_head": per_head, "keep_window": True},
        "planner": "every_layer",
    }


@preset("streamingllm")
def streamingllm(sinks: int = 4) -> dict[str, Any]:
    """StreamingLLM (arXiv 2309.17453): keep the first `sinks` tokens and the most recent ones."""
    return {
        "scorer": "streamingllm",
        "grouper": "token",
        "selector": {"name": "topk", "sinks": sinks, "keep_window": False},
        "planner": "every_layer",
    }


@preset("knorm")
def knorm(per_head: bool = True) -> dict[str, Any]:
    """Key-norm (arXiv 2406.11430): keep the keys with the smallest L2 norm, per KV head."""
    return {"scorer": "knorm", "grouper": "token", "selector": {"name": "topk", "per_head": per_head}}


@preset("random")
def random(seed: int = 0, per_head: bool = True) -> dict[str, Any]:
    """Random eviction (seeded): the floor every policy must beat."""
    return {"scorer": {"name": "random", "seed": seed}, "grouper": "token", "selector": {"name": "topk", "per_head": per_head}}


@preset("chunkkv-adaptive")
def chunkkv_adaptive(chunk_size: int = 16, window: int = 32, kernel: int = 5) -> dict[str, Any]:
    """ChunkKV chunks with AdaKV head-adaptive budgets (allocator 'adaptive'; ragged heads).

    Chunks of 16 are whole FlexAttention KV blocks, so in mask mode an evicted chunk is a skipped
    block; in evict mode (default) each head is padded to the widest head.
    """
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel},
        "grouper": {"name": "chunk", "size": chunk_size, "reduce": "sum"},
        "selector": {"name": "topk", "per_head": True},
        "allocator": "adaptive",
        "planner": "every_layer",
    }


@preset("adakv")
def adakv(window: int = 64, kernel: int = 5) -> dict[str, Any]:
    """AdaKV (arXiv 2407.11550): SnapKV token scores, a layer's heads share one budget."""
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel},
        "grouper": "token",
        "selector": {"name": "topk", "per_head": True},
        "allocator": "adaptive",
    }


@preset("pyramidkv")
def pyramidkv(window: int = 64, kernel: int = 5, spread: float = 0.5) -> dict[str, Any]:
    """PyramidKV (arXiv 2406.02069): SnapKV per head, budgets decreasing with depth, same total."""
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel},
        "grouper": "token",
        "selector": {"name": "topk", "per_head": True},
        "allocator": {"name": "pyramid", "spread": spread},
    }


@preset("chunkkv-global")
def chunkkv_global(chunk_size: int = 10, window: int = 32, kernel: int = 5) -> dict[str, Any]:
    """ChunkKV chunks ranked across every layer and head at once (allocator 'global', after the prefill)."""
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel},
        "grouper": {"name": "chunk", "size": chunk_size, "reduce": "sum"},
        "selector": {"name": "topk", "per_head": True},
        "allocator": "global",
    }


@preset("chunkkv-sentence")
def chunkkv_sentence(max_size: int = 32, window: int = 32, kernel: int = 5, reduce: str = "mean") -> dict[str, Any]:
    """ChunkKV with sentence-boundary chunks (cut at . ! ? ; : and newlines, at most max_size tokens)."""
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel},
        "grouper": {"name": "sentence", "max_size": max_size, "reduce": reduce},
        "selector": {"name": "topk", "keep_window": True},
        "planner": "every_layer",
    }


def _tokens_or_chunks(chunk_size: int) -> Any:
    """The grouper spec: single tokens for ``chunk_size == 1``, else ChunkKV chunks (summed scores)."""
    return "token" if chunk_size == 1 else {"name": "chunk", "size": chunk_size, "reduce": "sum"}


def _allocated(selector: dict[str, Any], allocator: str) -> dict[str, Any]:
    """A spec fragment: the allocator, and per-head selection when it pools heads' budgets."""
    from ..registry import build_part

    pools = build_part("allocator", allocator).pools_heads
    return {"selector": {**selector, "per_head": True} if pools else selector, "allocator": allocator}


@preset("kvzip")
def kvzip(
    chunk_size: int = 2048, sinks: int = 4, plus: bool = False, allocator: str = "global", recent: int = 0,
    pool: int = 0, observe: int = 0, aligned: bool = False, local: bool = False,
) -> dict[str, Any]:
    """KVzip (arXiv 2505.23416): keep what the model attends to while reconstructing the context.

    One extra pass after the prefill (the repeat prompt + the context, teacher-forced); token
    scores per KV head; by default one top-k over every layer and head (``allocator='global'``).
    ``plus=True`` is KVzip+ normalisation; ``recent`` last tokens always kept; ``pool=r``: a
    token also takes the best score within ``r`` neighbours (keeps spans around peaks);
    ``observe=w``: the last ``w`` prefill queries count as reconstruction queries too;
    ``aligned=True``: reconstruction positions continue across chunks (``KVzipScorer.continue_positions``:
    every chunk copied from the same distance; contexts longer than ``chunk_size`` only);
    ``local=True``: the pass attends only to what it scores (``KVzipScorer.local``, cheaper on
    long contexts). Needs the tokenizer: ``with press(model, tokenizer=tok)``.
    """
    return {
        "scorer": {"name": "kvzip", "chunk_size": chunk_size, "sinks": sinks, "plus_normalization": plus, "window": recent,
                   "pool": pool, "observe": observe, "continue_positions": aligned, "local": local},
        "grouper": "token",
        **_allocated({"name": "topk", "per_head": True, "sinks": sinks, "keep_window": recent > 0}, allocator),
    }


@preset("kvzip-observe")
def kvzip_observe(
    observe: int = 32, chunk_size: int = 2048, sinks: int = 4, plus: bool = False, allocator: str = "global",
    recent: int = 0, pool: int = 0, aligned: bool = True, local: bool = False,
) -> dict[str, Any]:
    """KVzip whose last ``observe`` prefill queries also count as reconstruction queries, with
    reconstruction positions that continue across chunks (``kvzip(observe=32, aligned=True)``):
    what the context holds, plus what its last sentence reads, every chunk scored alike.

    Measured on the leaderboard (SmolLM2-135M, prose needles, query-agnostic; docs/eval.md):
    ``observe=32`` keeps as many needles as ``kvzip`` over 2000 and 4000 tokens (36 of 42 runs
    each) with a fidelity KL no higher at every ratio and length (0.005 / 0.028 / 0.146 vs 0.007
    / 0.062 / 0.373 at 2000 tokens and 50 / 75 / 90% removed). ``aligned`` changes nothing up to
    one chunk (2048 tokens); at 4000 tokens it keeps 5 of 5 needles at 75% removed (4 without) and
    3 of 5 at 90% (3 without), KL 0.018 / 0.092 vs 0.020 / 0.108. Same cost as ``kvzip``;
    ``local`` is :func:`kvzip`'s cheaper pass.
    """
    return kvzip(chunk_size, sinks, plus, allocator, recent, pool, observe, aligned, local)


@preset("chunkkv-kvzip")
def chunkkv_kvzip(
    chunk_size: int = 10, sinks: int = 4, plus: bool = False, allocator: str = "uniform", reduce: str = "sum",
    per_head: bool = False, pass_chunk_size: int = 2048, recent: int = 0, observe: int = 0, aligned: bool = False,
    local: bool = False,
) -> dict[str, Any]:
    """ChunkKV chunks ranked by KVzip reconstruction scores (no other library combines them).

    ``observe``, ``aligned`` and ``local`` are :func:`kvzip`'s (the last prefill queries as extra
    reconstruction queries; positions continued across pass chunks; the pass attends only to what
    it scores); ``reduce='max'`` ranks a
    chunk by its best token, which suits KVzip's peaked scores.
    """
    return {
        "scorer": {
            "name": "kvzip", "chunk_size": pass_chunk_size, "sinks": sinks, "plus_normalization": plus, "window": recent,
            "observe": observe, "continue_positions": aligned, "local": local,
        },
        "grouper": {"name": "chunk", "size": chunk_size, "reduce": reduce},
        **_allocated({"name": "topk", "per_head": per_head, "sinks": sinks, "keep_window": recent > 0}, allocator),
    }


@preset("expected-attention")
def expected_attention(future: int = 512, sinks: int = 4, allocator: str = "adaptive", chunk_size: int = 1) -> dict[str, Any]:
    """Expected attention (arXiv 2510.00636): future queries as a Gaussian; no pass, no question.

    Head-adaptive budgets by default (``allocator='adaptive'``, AdaKV-style: kvpress reports +5
    RULER points from them); ``chunk_size > 1`` ranks ChunkKV chunks of the same scores.
    """
    return {
        "scorer": {"name": "expected-attention", "future": future, "sinks": sinks},
        "grouper": _tokens_or_chunks(chunk_size),
        **_allocated({"name": "topk", "per_head": True, "sinks": sinks, "keep_window": False}, allocator),
    }


@preset("chunkkv-expected")
def chunkkv_expected(chunk_size: int = 10, future: int = 512, sinks: int = 4, allocator: str = "uniform") -> dict[str, Any]:
    """ChunkKV chunks of expected-attention scores, one selection shared by a layer's heads."""
    return {
        "scorer": {"name": "expected-attention", "future": future, "sinks": sinks},
        "grouper": {"name": "chunk", "size": chunk_size, "reduce": "sum"},
        **_allocated({"name": "topk", "per_head": False, "sinks": sinks, "keep_window": False}, allocator),
    }


@preset("keydiff")
def keydiff(per_head: bool = True, chunk_size: int = 1) -> dict[str, Any]:
    """KeyDiff (arXiv 2504.15364): keep the keys least like their head's mean key; query-free."""
    return {"scorer": "keydiff", "grouper": _tokens_or_chunks(chunk_size), "selector": {"name": "topk", "per_head": per_head}}


@preset("tova")
def tova(chunk_size: int = 1) -> dict[str, Any]:
    """TOVA (arXiv 2401.06104): the last token's attention, averaged over heads; one selection."""
    return {"scorer": "tova", "grouper": _tokens_or_chunks(chunk_size), "selector": {"name": "topk", "keep_window": True}}


@preset("observed")
def observed(queries: int = 256, per_head: bool = True, chunk_size: int = 1) -> dict[str, Any]:
    """H2O-style observed attention (arXiv 2306.14048) of the last `queries` prefill queries."""
    return {
        "scorer": {"name": "observed", "queries": queries},
        "grouper": _tokens_or_chunks(chunk_size),
        "selector": {"name": "topk", "per_head": per_head, "sinks": 4},
    }


@preset("chunkkv-entropy")
def chunkkv_entropy(chunk_size: int = 10, spiky_keep: int = 4, window: int = 32, kernel: int = 5) -> dict[str, Any]:
    """ChunkKV with an entropy gate: spiky important chunks keep their top tokens, freeing budget."""
    return {
        "scorer": {"name": "snapkv", "window": window, "kernel": kernel},
        "grouper": {"name": "chunk", "size": chunk_size, "reduce": "sum"},
        "selector": {"name": "entropy-gated", "spiky_keep": spiky_keep, "keep_window": True},
    }

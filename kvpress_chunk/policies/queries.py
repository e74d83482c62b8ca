"""How an HF attention layer forms its queries and attention logits, for the scorers that rebuild
them from the layer's hidden states (SnapKV/ChunkKV, TOVA, observed attention, expected attention,
KVzip).

HF attention modules do not expose their queries, so (like kvpress) the scorers re-project the
layer's input hidden states. Families differ in every step after the projection, and a step done
the Llama way on a family that does it otherwise gives wrong scores with no error:

* the projection: ``q_proj``, a fused ``qkv_proj`` (Phi-3, queries first) or a gated ``q_proj``
  whose per-head output is ``(query, gate)`` (Qwen3-Next);
* the query norm before RoPE: over the head dim (Qwen3, Gemma 3), over ``(heads, head dim)``
  (Cohere), over the whole projection (OLMo 2/3), one norm per head (StableLM), LFM2's unflagged
  ``q_layernorm``; a submodule named like a query norm that is none of these is refused;
* the rotation: the family's own ``apply_rotary_pos_emb`` is used (looked up in the module's
  modeling file), so halves (Llama), interleaved pairs (Cohere, Helium, ERNIE 4.5, GLM) and
  partial rotary inside the function (GLM, Qwen3-Next, Nemotron, Phi-3) are all the model's own;
  Phi and StableLM rotate their first ``rotary_ndims`` dims outside it, which is done here too;
* layers without RoPE: SmolLM3's ``no_rope_layers`` (``use_rope``), the full layers of Cohere 2
  (rotation only ``if self.sliding_window is not None``): read from the forward's source;
* a query norm after RoPE (HunYuan's ``query_layernorm``);
* the logits: ``scaling`` (Gemma's ``query_pre_attn_scalar``, Granite's multiplier) and Gemma 2's
  ``attn_logit_softcapping`` (``cap * tanh(logit / cap)``, see :func:`logit_softcap`).

What cannot be rebuilt is refused with :class:`UnsupportedModelError` (Llama 4, gpt-oss's
attention sinks, unknown projection or norm layouts) instead of scored wrongly.
``tests/test_architecture_fidelity.py`` compares the rebuilt window attention with the model's
own attention probabilities per family.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import sys
import textwrap

import torch
from torch import nn

from ..hf.hooks import UnsupportedModelError

QUERY_FREE_SCORERS = "knorm, keydiff, streamingllm or random"


def refusal(module: nn.Module, why: str, hint: str | None = None) -> UnsupportedModelError:
    """The error for a layer whose queries or logits this library cannot rebuild."""
    return UnsupportedModelError(
        f"{type(module).__name__} {why}: the scorers that rebuild the model's queries (snapkv/chunkkv, tova, "
        f"observed, expected-attention, kvzip) cannot score this model faithfully. "
        + (hint or f"Use a scorer that reads no queries ({QUERY_FREE_SCORERS}).")
    )


def head_dim_of(module: nn.Module) -> int:
    config = module.config
    return getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_scaling(module: nn.Module) -> float:
    """The softmax scaling the module applies to ``q . k`` (Gemma's differs from 1/sqrt(d))."""
    return getattr(module, "scaling", None) or 1.0 / math.sqrt(head_dim_of(module))


def logit_softcap(module: nn.Module) -> float | None:
    """Gemma 2's (and VaultGemma's) attention logit soft cap: the model attends with
    ``cap * tanh(scaled logit / cap)``; ``None`` for models without one."""
    cap = getattr(module, "attn_logit_softcapping", None)
    return float(cap) if cap else None


def softcap_extra(module: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """``{"softcap": 0-d float32 tensor}`` for a soft-capped module, ``{}`` otherwise: what the
    window scorers' ``prepare`` adds for their (compiled) ``score``. A tensor, not a float, so
    that compiled graphs do not specialise on its value; absent, the graphs stay as they were."""
    cap = logit_softcap(module)
    return {} if cap is None else {"softcap": torch.tensor(cap, dtype=torch.float32, device=device)}


def apply_softcap(logits: torch.Tensor, softcap: torch.Tensor | float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (``logits`` already scaled), or ``logits`` when ``softcap`` is None."""
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap


def check_queries_supported(module: nn.Module) -> None:
    """Refuse attention layers whose queries or softmax this library cannot rebuild."""
    name = type(module).__name__
    if name.startswith("Llama4"):
        raise refusal(module, "forms its queries in ways not rebuilt here (complex RoPE, an L2 query norm after it, "
                              "position-dependent temperature tuning on its NoPE layers)")
    if isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise refusal(module, "adds learned attention sinks to its softmax (gpt-oss), which the rebuilt window "
                              "attention leaves out")
    _gated(module, head_dim_of(module) * module.config.num_attention_heads)  # refuses an unknown q_proj width
    projection = getattr(module, "q_proj", None) or getattr(module, "qkv_proj", None)
    if isinstance(projection, nn.Module):
        try:
            required = [p for p in inspect.signature(projection.forward).parameters.values()
                        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            required = []
        if len(required) > 1:  # ZAYA's CCA projection reads the cache: not a function of the hidden states
            raise refusal(module, f"has a query projection ({type(projection).__name__}) that takes more than the "
                                  "hidden states")
    unread = unread_query_norm(module)
    if unread is not None:
        raise refusal(module, f"normalises its queries with `{unread}`, a layout not rebuilt here")


#: Attention classes (name prefixes) whose ``q_proj`` emits ``(query, gate)`` per head.
GATED_QUERY_FAMILIES = ("Qwen3Next", "Qwen3_5")


def _gated(module: nn.Module, width: int) -> bool:
    """Whether ``q_proj`` emits ``(query, gate)`` per head (Qwen3-Next's, Qwen3.5's gated attention)."""
    projection = getattr(module, "q_proj", None)
    out = getattr(projection, "out_features", None)
    if out is None or out == width:
        return False
    if out == 2 * width and (type(module).__name__.startswith(GATED_QUERY_FAMILIES) or getattr(module.config, "attn_output_gate", False)):
        return True
    raise refusal(module, f"has a q_proj of {out} outputs for {width} query dims (an unknown query layout)")


def pre_rope_query_norm(module: nn.Module) -> nn.Module | None:
    """The query norm the module applies before RoPE: ``q_norm``, or ``q_layernorm`` (Phi and
    StableLM build and apply theirs when ``qk_layernorm`` says so; LFM2 always applies its own,
    with no flag: it was taken for absent, so its window attention was scored on unnormalised
    queries, off by 0.5 from the model's, no error)."""
    norm = getattr(module, "q_norm", None)
    if norm is None and getattr(module, "qk_layernorm", True):
        norm = getattr(module, "q_layernorm", None)
    return norm if isinstance(norm, nn.Module) else None


#: names of submodules that look like a norm on the queries (``q_norm``, ``qk_norm``,
#: ``q_layer_norm``, ``query_layernorm``...)
QUERY_NORM_NAME = re.compile(r"^(q|qk|query)_(\w+_)?(norm|layernorm|layer_norm|ln)s?$")


def unread_query_norm(module: nn.Module) -> str | None:
    """The name of a submodule that looks like a query norm but is not one the rebuild applies
    (:func:`pre_rope_query_norm`, :func:`post_rope_norm`), or ``None``. Why: a norm the rebuild
    does not know about is silently skipped (scores for other queries than the model's)."""
    read = {id(pre_rope_query_norm(module)), id(post_rope_norm(module))}
    for name, child in module.named_children():
        if QUERY_NORM_NAME.match(name) and id(child) not in read:
            return name
    return None


def _pre_rope_norm(module: nn.Module, flat: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``flat[B, n, Hq * D]`` -> ``[B, Hq, n, D]`` with the module's query norm (if any) applied in
    the layout the module applies it."""
    batch, length = flat.shape[:2]
    norm = pre_rope_query_norm(module)
    per_head = flat.reshape(batch, length, heads, head_dim)
    if not isinstance(norm, nn.Module):
        return per_head.transpose(1, 2)
    norms = getattr(norm, "norms", None)
    if isinstance(norms, nn.ModuleList) and len(norms) == heads:  # StableLM: one LayerNorm per head, on [B, H, n, D]
        return norm(per_head.transpose(1, 2))
    weight = getattr(norm, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    if shape == (heads * head_dim,):  # OLMo 2/3: over the whole projection
        return norm(flat).reshape(batch, length, heads, head_dim).transpose(1, 2)
    if shape in ((head_dim,), (heads, head_dim)):  # over the head dim (Qwen3...), or (heads, head dim) (Cohere)
        return norm(per_head).transpose(1, 2)
    raise refusal(module, f"has a query norm ({type(norm).__name__}, weight {shape}) of an unknown layout")


def query_states(module: nn.Module, hidden: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-RoPE queries ``[B, Hq, n, D]`` of ``hidden[B, n, hidden]`` (query norm applied).

    ``projected``: the query projection's output as the forward computed it (``[B, n, >= Hq * D]``,
    wider for a fused or gated projection), used instead of projecting again."""
    check_queries_supported(module)
    batch, length, _ = hidden.shape
    head_dim, heads = head_dim_of(module), module.config.num_attention_heads
    width = heads * head_dim
    gated = _gated(module, width)
    needed = 2 * width if gated else width
    if projected is not None and projected.shape[:2] == (batch, length) and projected.shape[-1] >= needed:
        flat = projected
    elif hasattr(module, "q_proj"):
        flat = module.q_proj(hidden)
    elif hasattr(module, "qkv_proj"):
        flat = module.qkv_proj(hidden)
    else:
        raise NotImplementedError(
            f"cannot find the query projection of {type(module).__name__} (expected q_proj or qkv_proj)"
        )
    if gated:  # per head: D query dims, then D gate dims
        flat = flat[..., : 2 * width].reshape(batch, length, heads, 2 * head_dim)[..., :head_dim].reshape(batch, length, width)
    else:
        flat = flat[..., :width]
    return _pre_rope_norm(module, flat, heads, head_dim)


#: ``if`` lines of an attention forward that may guard its RoPE call, and what they test.
_ROPE_GUARDS = {
    "if self.use_rope:": lambda module: bool(module.use_rope),  # SmolLM3 (no_rope_layers)
    "if self.sliding_window is not None:": lambda module: module.sliding_window is not None,  # Cohere 2: NoPE full layers
    "if self.sliding_window:": lambda module: bool(module.sliding_window),
    "if self.is_sliding:": lambda module: bool(module.is_sliding),
    # EXAONE 4: NoPE global layers when the model has sliding ones
    "if self.sliding_window is None or self.is_sliding:": lambda module: module.sliding_window is None or bool(module.is_sliding),
    # Cohere 2 MoE: NoPE full layers unless forced
    "if self.sliding_window is not None or self.force_rope:": lambda module: module.sliding_window is not None or bool(module.force_rope),
}


@functools.lru_cache(maxsize=None)
def _rope_guard(cls: type) -> str | None:
    """The ``if`` line guarding ``cls.forward``'s call of ``apply_rotary_pos_emb`` (``None``:
    unconditional, or no source to read); ``"?"`` for a guard not in :data:`_ROPE_GUARDS`."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls.forward)).splitlines()
    except (OSError, TypeError):
        return None
    calls = [i for i, line in enumerate(lines) if "apply_rotary_pos_emb(" in line and not line.lstrip().startswith("#")]
    if not calls:
        return None
    indent = lambda line: len(line) - len(line.lstrip())  # noqa: E731
    call = calls[0]
    for line in reversed(lines[:call]):  # the statement the call is nested in
        if line.strip() and indent(line) < indent(lines[call]):
            guard = line.strip()
            if not guard.startswith(("if ", "elif ", "else")):
                return None  # the function body itself (or a with/for block): unconditional
            return guard if guard in _ROPE_GUARDS else "?"
    return None


def uses_rope(module: nn.Module, position_embeddings) -> bool:
    """Whether this layer rotates its queries (NoPE layers of SmolLM3 / Cohere 2 do not)."""
    if position_embeddings is None:
        return False
    flag = getattr(module, "use_rope", None)
    if flag is not None and not flag:  # SmolLM3, Llama 4: no_rope_layers
        return False
    guard = _rope_guard(type(module))
    if guard == "?":
        raise refusal(module, "applies RoPE under a condition this library does not know")
    return guard is None or _ROPE_GUARDS[guard](module)


def _llama_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE helper used by Llama-family models (the two halves of the head dim are swapped)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@functools.lru_cache(maxsize=None)
def _rope_function(cls: type):
    """``rotate(q, cos, sin) -> q`` with the family's own ``apply_rotary_pos_emb`` (the one its
    forward calls): ``(q, k, cos, sin, ...)`` (most families) or ``(x, cos, sin, ...)``
    (Gemma 3n); ``None`` when the file has none (Llama's rotation is then used)."""
    # The name as the forward sees it (the globals of the module defining it, decorators
    # unwrapped: right for an inherited forward too), else the class's own module.
    forward = getattr(cls, "forward", None)
    namespace = getattr(inspect.unwrap(forward), "__globals__", {}) if callable(forward) else {}
    function = namespace.get("apply_rotary_pos_emb") or getattr(sys.modules.get(cls.__module__), "apply_rotary_pos_emb", None)
    if not callable(function):
        return None
    try:
        # transformers >= 5.2x wraps it in a module (hub kernels) whose forward is the function
        target = function.forward if isinstance(function, nn.Module) else function
        names = list(inspect.signature(target).parameters)[:4]
    except (TypeError, ValueError):
        names = []
    if names[:4] == ["q", "k", "cos", "sin"]:
        # The key argument only has to broadcast: one head of the queries.
        return lambda q, cos, sin: function(q, q[:, :1], cos, sin)[0]
    if names[1:3] == ["cos", "sin"]:
        return lambda q, cos, sin: function(q, cos, sin)
    return "?"


def rotate(module: nn.Module, queries: torch.Tensor, position_embeddings) -> torch.Tensor:
    """``queries[B, Hq, n, D]`` rotated as the module rotates them (unchanged on NoPE layers);
    ``position_embeddings``: the ``(cos, sin)`` pair ``[B, n, *]`` of these ``n`` positions."""
    if not uses_rope(module, position_embeddings):
        return queries
    cos, sin = position_embeddings
    if torch.is_complex(cos):
        raise refusal(module, "passes complex rotary embeddings (not a (cos, sin) pair)")
    apply = _rope_function(type(module))
    if apply == "?":
        raise refusal(module, "has an apply_rotary_pos_emb of an unknown signature in its modeling file")
    if apply is None:
        if cos.shape[-1] != queries.shape[-1]:
            raise refusal(module, f"has rotary embeddings of {cos.shape[-1]} dims for {queries.shape[-1]}-dim heads and "
                                  "no apply_rotary_pos_emb in its modeling file")
        apply = _llama_rope
    rotary = getattr(module, "rotary_ndims", None)  # Phi, StableLM: the first dims rotate, outside the function
    if isinstance(rotary, int) and 0 < rotary < queries.shape[-1]:
        return torch.cat([apply(queries[..., :rotary], cos, sin), queries[..., rotary:]], dim=-1)
    return apply(queries, cos, sin)


def post_rope_norm(module: nn.Module) -> nn.Module | None:
    """A query norm the module applies *after* RoPE (HunYuan's ``query_layernorm``), or ``None``."""
    norm = getattr(module, "query_layernorm", None)
    return norm if isinstance(norm, nn.Module) else None


def rotated_queries(module: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Post-RoPE queries of ``hidden``, with the attention scaling folded in: ``[B, Hq, n, D]``.

    ``position_embeddings`` is the ``(cos, sin)`` pair of exactly these ``n`` tokens (``None``
    for models without RoPE). Folding the scaling into the queries keeps the compiled scorers
    from specialising on a Python float.
    """
    queries = rotate(module, query_states(module, hidden), position_embeddings)
    norm = post_rope_norm(module)
    if norm is not None:
        queries = norm(queries)
    return queries * attention_scaling(module)


def check_linear_rotation(module: nn.Module) -> None:
    """Refuse a layer whose post-RoPE queries are not a linear map of its pre-RoPE ones (a query
    norm after RoPE): expected attention rotates their Gaussian statistics by a matrix."""
    if post_rope_norm(module) is not None:
        raise refusal(module, "normalises its queries after RoPE (HunYuan), which expected attention's Gaussian "
                              "model of the rotated queries cannot represent",
                      hint="The window scorers (snapkv/chunkkv, tova, observed) and kvzip support it.")


def rotation_matrix(module: nn.Module, cos: torch.Tensor, sin: torch.Tensor, dim: int) -> torch.Tensor:
    """``R[B, D, D]`` with ``R q`` = the module's rotation of ``q`` under ``(cos, sin)`` ``[B, *]``
    (one position each; RoPE is linear in ``q``): the rotation applied to the ``D`` unit
    vectors. Identity on NoPE layers. Refuses a query norm after RoPE (not linear)."""
    check_linear_rotation(module)
    batch = cos.shape[0]
    basis = torch.eye(dim, dtype=cos.dtype, device=cos.device)[None, None].expand(batch, 1, dim, dim)
    per_row = (cos[:, None, :].expand(batch, dim, cos.shape[-1]), sin[:, None, :].expand(batch, dim, sin.shape[-1]))
    rotated = rotate(module, basis, per_row)  # [B, 1, D, D]: row i is R e_i
    return rotated[:, 0].transpose(-1, -2)

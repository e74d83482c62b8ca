"""Scorers: how important is each cached token? ``-> scores[B, Hkv, T]`` (higher = keep).

A scorer has two halves, split on purpose:

* :meth:`Scorer.prepare` runs eagerly and may touch the HF attention module (projections, norms,
  RoPE). It returns plain tensors.
* :meth:`Scorer.score` is a pure tensor function of those tensors. It is traced by
  ``torch.compile(fullgraph=True)`` together with the grouper and selector, so it must not call
  ``.item()``, branch on tensor values or touch modules.

Padding: ``valid[B, T]`` marks real tokens (left padding is ``False``). Scores at padding positions
are ignored downstream, but scorers must not let padding change the scores of real tokens, so that
a batch row gets exactly the selection it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

from ..registry import register
from .groupers import positions_from_row_start
from .layer_inputs import LayerInputs
from .validation import check_choice, check_int, refuse_setting
from .queries import (  # noqa: F401  (re-exported: the scorers' module-aware helpers live there)
    apply_softcap,
    attention_scaling,
    check_queries_supported,
    head_dim_of,
    query_states,
    rotate_half,
    rotated_queries,
    softcap_extra,
)
from .window_attention import snapkv_scores, window_attention_sum, window_pad_value


class Scorer:
    """Base class: subclasses are frozen dataclasses registered with ``@register("scorer", name)``."""

    #: Trailing tokens the scorer observes (its observation window); 0 if it has none. Selectors
    #: may protect them, and contexts not longer than it are passed through uncompressed.
    window: int = 0
    #: Whether the scorer needs an extra forward pass of the model after the prefill (KVzip's
    #: context reconstruction). Such a scorer implements ``pass_chunks`` and ``pass_scores``
    #: (see :class:`~kvpress_chunk.policies.kvzip.KVzipScorer`); the session then scores every
    #: layer after the prefill, so the uncompressed cache lives until the pass ends.
    context_pass: bool = False
    #: Whether :meth:`prepare` reads the queries of *every* prefill token (expected attention's
    #: statistics). The session then keeps each layer's query projection from the prefill's own
    #: forward (``LayerInputs.projected_queries``) instead of letting the scorer project the
    #: whole prompt again: at SmolLM2's shape and 8k tokens that second projection was 33 ms of
    #: the op's 73 ms per layer.
    reads_queries: bool = False
    #: Whether :meth:`prepare` rebuilds the model's queries from the hidden states
    #: (:mod:`~.queries`): the session then checks every compressed layer when the press is
    #: entered (:meth:`check_module`), so a model they cannot rebuild is refused before a forward.
    rebuilds_queries: bool = False

    def check_module(self, module) -> None:
        """Raise :class:`~kvpress_chunk.UnsupportedModelError` if this scorer cannot score the
        attention ``module`` faithfully (called once per compressed layer when a press is entered)."""
        if self.rebuilds_queries:
            check_queries_supported(module)

    def decode_queries(self, every: int) -> int | None:
        """How many of the latest tokens' hidden states a decoding-time scoring reads
        (:mod:`~kvpress_chunk.decoding`, compressing every ``every`` generated tokens), or
        ``None`` if this scorer cannot score from them (decoding then refuses it). Window
        scorers read exactly their window. Why it is asked: decoding keeps only these hidden
        states; it kept the window's alone, so expected attention's statistics came from one
        query (covariance 0) and ``observed`` scored as TOVA, silently."""
        return self.window

    def deferred_hidden(self) -> int:
        """How many trailing hidden states :meth:`prepare` reads when it runs after the prefill
        (deferred layers: whole-cache stage, context pass). The session keeps only those of a
        deferred layer, not the whole prompt's."""
        return 0

    def prepare(self, inputs: LayerInputs) -> dict[str, torch.Tensor]:
        """Eager, module-aware preparation. Returns the extra tensors :meth:`score` needs."""
        return {}

    def score(self, keys: torch.Tensor, valid: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """Pure tensor scoring: ``keys[B, Hkv, T, D]``, ``valid[B, T]`` -> ``float32[B, Hkv, T]``."""
        raise NotImplementedError


def window_queries(inputs: LayerInputs, window: int) -> torch.Tensor:
    """Post-RoPE, pre-scaled queries of the last ``window`` tokens: ``[B, Hq, window, D]``."""
    check_queries_supported(inputs.module)  # before reading position_embeddings (Llama 4's are not (cos, sin))
    rope = inputs.position_embeddings
    if rope is not None:
        rope = (rope[0][:, -window:], rope[1][:, -window:])
    return rotated_queries(inputs.module, inputs.hidden_states[:, -window:], rope)


def observation_window_attention(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, softcap: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of the window queries over all keys, fp32: ``[B, Hkv, G, w, T]``.

    ``softcap``: the model's logit soft cap (Gemma 2, :func:`~.queries.logit_softcap`), if any.

    GQA-aware without copying keys: the ``G`` query heads sharing a KV head are folded into the
    query axis. Causal inside the window; padding keys get zero weight; padding *queries* (rows
    shorter than the window) get a uniform row that callers drop via their query mask.
    """
    batch, kv_heads, length, head_dim = keys.shape
    q_heads, window = queries.shape[1], queries.shape[2]
    groups = q_heads // kv_heads
    q = queries.float().reshape(batch, kv_heads, groups * window, head_dim)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).view(batch, kv_heads, groups, window, length)
    logits = apply_softcap(logits, softcap)
    key_pos = torch.arange(length, device=keys.device)
    query_pos = torch.arange(length - window, length, device=keys.device)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None] & valid[:, None, :]  # [B, w, T]
    logits = logits.masked_fill(~allowed[:, None, None], torch.finfo(torch.float32).min)
    return torch.softmax(logits, dim=-1)


@register("scorer", "snapkv")
@dataclass(frozen=True)
class SnapKVScorer(Scorer):
    """Observation-window attention (SnapKV, arXiv 2404.14469), as used by ChunkKV.

    The last ``window`` queries attend over the prefix; a token's score is its attention averaged
    over the window queries, smoothed by an average pool of ``kernel`` tokens and averaged over
    the query heads of each GQA group (one score per KV head).

    ``window_scores`` says what the window tokens themselves get: ``"zero"`` (they are protected
    by the selector, paper Algorithm 1) or ``"max+1"`` (kvpress: larger than every prefix score,
    so token-level selection keeps them; chunk-level selection may not).
    """

    rebuilds_queries = True

    window: int = 32
    kernel: int = 5
    window_scores: str = "zero"

    def __post_init__(self) -> None:
        check_int(self, "window", minimum=1, meaning="observation-window queries")
        if check_int(self, "kernel", minimum=1) % 2 == 0:
            refuse_setting(self, "kernel", "a positive odd int (the width of the centred average pool)")
        check_choice(self, "window_scores", ("zero", "max+1"))

    def prepare(self, inputs: LayerInputs) -> dict[str, torch.Tensor]:
        return {"queries": window_queries(inputs, self.window), **softcap_extra(inputs.module, inputs.keys.device)}

    def score(
        self, keys: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor, softcap: torch.Tensor | None = None
    ) -> torch.Tensor:
        # One matmul, in-place masks and softmax, one mat-vec (see window_attention.py): about
        # the cost of the bare window attention; score_reference is the plain twin it is tested on.
        return snapkv_scores(queries, keys, valid, self.kernel, self.window_scores, softcap)

    def score_reference(
        self, keys: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor, softcap: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`score` written plainly: softmax probabilities, mean over the window queries,
        pool, mean over the GQA group (equal up to float summation order)."""
        batch, kv_heads, length, _ = keys.shape
        window = queries.shape[2]
        probs = observation_window_attention(queries, keys, valid, softcap)[..., : length - window]
        query_valid = valid[:, length - window :].to(probs.dtype)[:, None, None, :, None]
        n_queries = query_valid.sum(dim=3).clamp(min=1.0)
        per_query_head = (probs * query_valid).sum(dim=3) / n_queries  # [B, Hkv, G, T - w]
        groups = per_query_head.shape[2]
        pooled = F.avg_pool1d(
            per_query_head.reshape(batch * kv_heads * groups, 1, length - window),
            kernel_size=self.kernel,
            padding=self.kernel // 2,
            stride=1,
        ).view(batch, kv_heads, groups, length - window)
        scores = pooled.mean(dim=2)
        window_part = window_pad_value(scores, self.window_scores).expand(batch, kv_heads, window)
        return torch.cat([scores, window_part], dim=-1)


@register("scorer", "knorm")
@dataclass(frozen=True)
class KnormScorer(Scorer):
    """Negative L2 norm of the keys (arXiv 2406.11430): low-norm keys draw attention, keep them."""

    def score(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return -torch.linalg.vector_norm(keys.float(), dim=-1)


@register("scorer", "streamingllm")
@dataclass(frozen=True)
class RecencyScorer(Scorer):
    """StreamingLLM (arXiv 2309.17453): the most recent tokens score highest.

    Pair it with a selector that protects ``sinks`` first tokens to get sinks + recent window.

    The score is the position counted from the row's first real token, so a row of a left-padded
    batch is scored as alone. (Positions in the padded batch shifted a row's scores by its
    padding: a token-level ranking does not care, but chunk sums and the entropy gate do, a short
    last chunk gaining less than the full ones: with chunk(size=16) and budget=20 a 60-token row
    beside a 73-token one kept other tokens than alone, logits 0.21 away.)
    """

    def score(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, kv_heads, length, _ = keys.shape
        positions = positions_from_row_start(valid.to(keys.device)).to(torch.float32)  # [B, T]
        return positions[:, None, :].expand(batch, kv_heads, length)


@register("scorer", "random")
@dataclass(frozen=True)
class RandomScorer(Scorer):
    """Uniform random scores, seeded per layer (``seed + layer index``): the baseline to beat.

    The random draw happens in :meth:`prepare` because random generators do not trace. Each row
    draws its own real tokens' scores from a freshly seeded generator, so a row of a padded batch
    is scored as alone (one draw over the whole batch gave a row other scores with other
    batch-mates or padding: logits 0.4 away from the row alone). Batch 1, unpadded: the same
    draw as one ``rand(1, H, T)``.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        # torch seeds a generator with a 64-bit int; ``seed + layer index`` must stay one.
        check_int(self, "seed", minimum=-(2**63), maximum=2**63 - 1)

    def prepare(self, inputs: LayerInputs) -> dict[str, torch.Tensor]:
        keys = inputs.keys
        valid = inputs.valid.to(keys.device)
        batch, heads, length = keys.shape[:-1]
        generator = torch.Generator(device=keys.device)
        noise = torch.zeros(batch, heads, length, device=keys.device, dtype=torch.float32)
        for row in range(batch):
            real = valid[row]
            generator.manual_seed(self.seed + inputs.layer_idx)
            drawn = torch.rand(heads, int(real.sum()), generator=generator, device=keys.device, dtype=torch.float32)
            noise[row][:, real] = drawn
        return {"noise": noise}

    def score(self, keys: torch.Tensor, valid: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise


@register("scorer", "keydiff")
@dataclass(frozen=True)
class KeyDiffScorer(Scorer):
    """KeyDiff (arXiv 2504.15364): keys unlike the rest are kept; score = minus the cosine of each
    key with the mean of the (real) normalised keys of its head. Query-free and cheap."""

    def score(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(keys.float(), dim=-1)
        weight = valid[:, None, :, None].to(unit.dtype)
        anchor = (unit * weight).sum(dim=2, keepdim=True) / weight.sum(dim=2, keepdim=True).clamp(min=1)
        return -(unit * F.normalize(anchor, dim=-1)).sum(dim=-1)


@register("scorer", "tova")
@dataclass(frozen=True)
class TOVAScorer(Scorer):
    """TOVA (arXiv 2401.06104): the last token's attention, averaged over every query head (one
    score for all KV heads, as the paper's single head-agnostic policy). The last token is the
    observation window (``window = 1``): a selector with ``keep_window`` keeps it."""

    rebuilds_queries = True

    window: int = 1

    def __post_init__(self) -> None:
        # The score is the last token's attention whatever ``window`` says: another value would
        # silently protect (keep_window) or pass through tokens the scorer does not observe.
        if check_int(self, "window") != 1:
            refuse_setting(self, "window", "1 (TOVA scores with the last token's attention: that token is its whole window)")

    def prepare(self, inputs: LayerInputs) -> dict[str, torch.Tensor]:
        return {"queries": window_queries(inputs, 1), **softcap_extra(inputs.module, inputs.keys.device)}

    def score(
        self, keys: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor, softcap: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, kv_heads, length, _ = keys.shape
        probs = observation_window_attention(queries, keys, valid, softcap)[..., 0, :]  # [B, Hkv, G, T]
        shared = probs.mean(dim=(1, 2))  # [B, T]
        return shared[:, None, :].expand(batch, kv_heads, length).contiguous()


@register("scorer", "observed")
@dataclass(frozen=True)
class ObservedAttentionScorer(Scorer):
    """H2O-style observed attention (arXiv 2306.14048): attention accumulated over the last
    ``queries`` prefill queries (0: every query), divided by how many of them could see the token
    (so early tokens are not favoured for being old), averaged over each KV head's query group.

    Unlike SnapKV there is no pooling and the queries are not protected (``window`` = 0): the
    score is what the prefill itself attended to. Every query costs ``T`` dot products per head,
    so ``queries=0`` is quadratic in the prompt; the default observes the last 256.
    """

    rebuilds_queries = True

    queries: int = 256

    def __post_init__(self) -> None:
        check_int(self, "queries", minimum=0, meaning="last prefill queries observed; 0: every one")

    def decode_queries(self, every: int) -> int | None:
        # its observers are the last queries *as positions of the keys* (causal inside the
        # window); after a decoding compression the latest tokens are no longer the last slots
        return 1 if self.queries == 1 else None

    def prepare(self, inputs: LayerInputs) -> dict[str, torch.Tensor]:
        length = inputs.keys.shape[-2]
        count = length if self.queries == 0 else min(self.queries, length)
        return {"observers": window_queries(inputs, count), **softcap_extra(inputs.module, inputs.keys.device)}

    def score(
        self, keys: torch.Tensor, valid: torch.Tensor, observers: torch.Tensor, softcap: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fused: each block of observers' attention summed by :func:`window_attention_sum` (one
        matmul, softmax in place, one mat-vec) instead of materialising and reducing the
        probabilities; equal to :meth:`score_reference` up to float rounding (tested)."""
        return self._accumulate(keys, valid, observers, softcap, fused=True)

    def score_reference(
        self, keys: torch.Tensor, valid: torch.Tensor, observers: torch.Tensor, softcap: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._accumulate(keys, valid, observers, softcap, fused=False)

    def _accumulate(
        self, keys: torch.Tensor, valid: torch.Tensor, observers: torch.Tensor, softcap: torch.Tensor | None, fused: bool
    ) -> torch.Tensor:
        batch, kv_heads, length, _ = keys.shape
        count = observers.shape[2]
        total = keys.new_zeros(batch, kv_heads, length, dtype=torch.float32)
        block = 256
        for lo in range(0, count, block):  # blocks bound the [B, Hkv, G, q, T] transient
            hi = min(count, lo + block)
            end = length - count + hi
            if fused:
                total[..., :end] += window_attention_sum(observers[:, :, lo:hi], keys[:, :, :end], valid[:, :end], softcap)
                continue
            probs = observation_window_attention(observers[:, :, lo:hi], keys[:, :, :end], valid[:, :end], softcap)
            query_valid = valid[:, end - (hi - lo) : end].to(probs.dtype)
            total[..., :end] += (probs * query_valid[:, None, None, :, None]).sum(dim=3).mean(dim=2)
        # Observers of token j: the real queries at positions >= j (a reverse cumulative count).
        observing = valid.to(torch.float32) * (torch.arange(length, device=keys.device) >= length - count)
        seen = observing.flip(-1).cumsum(dim=-1).flip(-1)
        return total / seen[:, None, :].clamp(min=1)

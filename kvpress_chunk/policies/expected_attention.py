"""Expected attention (arXiv 2510.00636): score keys by the attention that *future* queries are
expected to pay them, with no extra pass and no question.

Future queries are modelled as a Gaussian: the mean and covariance of the context's pre-RoPE
queries (the first ``sinks`` tokens excluded: they are outliers), rotated by the RoPE matrix
averaged over the next ``future`` positions. For ``q ~ N(mu, Sigma)`` and scaling ``s``,
``E[exp(s q.k)] = exp(s k.mu + s^2 k^T Sigma k / 2)``; the score is that expectation normalised
over the context (a softmax), averaged over the query heads of each KV head, times ``||v||``
(what the key would contribute).

The future rotation is extrapolated from the last two prefill positions' ``(cos, sin)``: RoPE
rotates each frequency by ``position x theta``, so two consecutive positions give ``theta`` and
the phase, whatever the model's RoPE scaling (no need to find its rotary module); the rotation
matrix is the model's own rotation function applied to the unit vectors
(:func:`~.queries.rotation_matrix`), so interleaved, partial and NoPE layouts match the model.
Rows of a left-padded batch use their own positions and statistics (padding is excluded), so a
row gets its solo scores. Gemma 2's logit soft cap is not modelled (the expectation of a capped
exponential has no closed form): its scores stay those of the uncapped logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register
from .groupers import positions_from_row_start
from .layer_inputs import LayerInputs
from .queries import check_linear_rotation, rotation_matrix
from .scorers import Scorer, attention_scaling, query_states
from .validation import check_bool, check_int, check_number


def averaged_future_rope(cos: torch.Tensor, sin: torch.Tensor, future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(cos, sin)`` ``[B, D]`` over the ``future`` positions after the last one of ``cos/sin[B, T, D]``."""
    last_c, last_s = cos[:, -1].double(), sin[:, -1].double()
    if cos.shape[1] >= 2:
        prev_c, prev_s = cos[:, -2].double(), sin[:, -2].double()
        step = torch.atan2(last_s * prev_c - last_c * prev_s, last_c * prev_c + last_s * prev_s)
    else:
        step = torch.zeros_like(last_c)
    amplitude = torch.sqrt(last_c**2 + last_s**2)
    phase = torch.atan2(last_s, last_c)
    offsets = torch.arange(1, future + 1, device=cos.device, dtype=torch.float64)
    angles = phase[..., None] + step[..., None] * offsets  # [B, D, future]
    mean_cos = (amplitude[..., None] * torch.cos(angles)).mean(dim=-1)
    mean_sin = (amplitude[..., None] * torch.sin(angles)).mean(dim=-1)
    return mean_cos.to(cos.dtype), mean_sin.to(sin.dtype)


def rope_matrix(mean_cos: torch.Tensor, mean_sin: torch.Tensor) -> torch.Tensor:
    """``R[B, D, D]`` with ``R x = x * cos + rotate_half(x) * sin`` (the averaged rotation, Llama's
    layout; the scorer uses :func:`~.queries.rotation_matrix`, the model's own rotation)."""
    batch, dim = mean_cos.shape
    half = dim // 2
    swap = torch.zeros(dim, dim, dtype=mean_cos.dtype, device=mean_cos.device)  # rotate_half as a matrix
    swap[:half, half:] = -torch.eye(half, dtype=mean_cos.dtype, device=mean_cos.device)
    swap[half:, :half] = torch.eye(half, dtype=mean_cos.dtype, device=mean_cos.device)
    return torch.diag_embed(mean_cos) + mean_sin[:, :, None] * swap[None]


@register("scorer", "expected-attention")
@dataclass(frozen=True)
class ExpectedAttentionScorer(Scorer):
    """Expected attention of future queries (arXiv 2510.00636); no extra pass.

    ``future``: positions the RoPE rotation is averaged over; ``sinks``: first tokens left out of
    the query statistics; ``covariance`` / ``value_norm``: the second-order term and the ``||v||``
    factor (both on in the paper); ``epsilon`` is added before the ``||v||`` factor.
    """

    future: int = 512
    sinks: int = 4
    covariance: bool = True
    value_norm: bool = True
    epsilon: float = 0.0

    reads_queries = True  # the statistics read every prefill query: reuse the forward's projection
    rebuilds_queries = True

    def check_module(self, module) -> None:
        super().check_module(module)
        check_linear_rotation(module)

    def decode_queries(self, every: int) -> int:
        """While decoding, the statistics are over the last ``every`` generated tokens' queries
        (the tokens since the last compression, as kvpress' DecodingPress buffers them), not one."""
        return every

    def __post_init__(self) -> None:
        check_int(self, "future", minimum=1, meaning="positions the RoPE rotation is averaged over")
        check_int(self, "sinks", minimum=0, meaning="first tokens left out of the query statistics")
        check_bool(self, "covariance")
        check_bool(self, "value_norm")
        check_number(self, "epsilon", minimum=0, meaning="added to the scores before the ||v|| factor")

    def prepare(self, inputs: LayerInputs) -> dict[str, torch.Tensor]:
        """What the compiled op reads: the pre-RoPE queries (a view of the forward's projection),
        each token's weight in the statistics, the averaged future rotation (times the attention
        scaling) and the values. The statistics themselves are computed inside the op (see
        :func:`query_statistics`), where the compiler fuses their passes over the queries."""
        module = inputs.module
        queries = query_states(module, inputs.hidden_states, inputs.projected_queries)  # [B, Hq, T, D], pre-RoPE
        if inputs.query_valid is None:  # prefill: the queries are the keys' tokens, sinks left out
            counted = (inputs.valid & (positions_from_row_start(inputs.valid) >= self.sinks)).float()  # [B, T]
            counted = torch.where(counted.sum(dim=-1, keepdim=True) > 0, counted, inputs.valid.float())
        else:  # decoding: the latest tokens' queries, none of them a sink
            counted = inputs.query_valid.float()  # [B, n]
        weights = counted / counted.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, T or n], each row sums to 1
        batch, dim = queries.shape[0], queries.shape[-1]
        if inputs.position_embeddings is not None:
            cos, sin = inputs.position_embeddings
            # The model's own rotation (halves, interleaved pairs, partial, none on NoPE layers).
            rotation = rotation_matrix(module, *averaged_future_rope(cos.float(), sin.float(), self.future), dim)
        else:
            rotation = torch.eye(dim, device=queries.device).expand(batch, dim, dim)
        return {
            "queries": queries,
            "weights": weights,
            "rotation": rotation * attention_scaling(module),
            "values": inputs.values,
        }

    def statistics(self, inputs: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The future queries' scaled mean ``[B, Hq, D]`` and covariance ``[B, Hq, D, D]`` that
        :meth:`score` computes (for inspection and tests)."""
        prepared = self.prepare(inputs)
        return query_statistics(prepared["queries"], prepared["weights"], prepared["rotation"])

    def score(
        self, keys: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor,
        rotation: torch.Tensor, values: torch.Tensor,
    ) -> torch.Tensor:
        mean, cov = query_statistics(queries, weights, rotation)
        value_norms = torch.linalg.vector_norm(values.float(), dim=-1)
        return expected_attention_scores(
            keys, valid, mean, cov, value_norms, self.covariance, self.value_norm, self.epsilon
        )


def query_statistics(
    queries: torch.Tensor, weights: torch.Tensor, rotation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean ``[B, Hq, D]`` and covariance ``[B, Hq, D, D]`` of ``queries[B, Hq, T, D]``
    (``weights[B, T]`` sum to 1 per row; 0 for sinks and padding), both mapped by ``rotation[B,
    D, D]``: ``R mu`` and ``R Sigma R^T``.

    Why inside the op: these are the passes over all ``T`` queries (a weighted sum, a centred and
    weighted copy, one ``D x D`` matmul per head); compiled, the elementwise parts fuse into the
    reductions instead of each writing a ``[B, Hq, T, D]`` temporary."""
    q = queries.float()
    w = weights[:, None, :, None]
    mean = (q * w).sum(dim=2)
    spread = (q - mean[:, :, None]) * w.sqrt()
    cov = spread.transpose(-1, -2) @ spread
    r = rotation[:, None].float()
    return (r @ mean[..., None])[..., 0], r @ cov @ r.transpose(-1, -2)


def expected_attention_scores(
    keys: torch.Tensor,
    valid: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
    value_norms: torch.Tensor,
    covariance: bool = True,
    value_norm: bool = True,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """``float32[B, Hkv, T]``: softmax over the context of ``k.mu + k^T Sigma k / 2`` (``mean`` /
    ``cov`` pre-scaled, per query head), averaged over each KV head's query group, times ``||v||``.

    How: both terms come from one matmul per KV head, ``k @ [Sigma_1 / 2 | ... | Sigma_G / 2]``
    with ``[mu_1 | ... | mu_G]`` as its additive term, then ``sum_d k_d (k Sigma_g / 2 + mu_g)_d``
    (= ``k^T Sigma_g k / 2 + k.mu_g``). Why: a broadcast matmul of ``k[B, Hkv, 1, T, D]`` with
    ``Sigma[B, Hkv, G, D, D]`` copies the keys ``G`` times and runs ``G`` narrow (``D``-column)
    products, and the linear term was a third pass over the keys."""
    batch, kv_heads, length, dim = keys.shape
    groups = mean.shape[1] // kv_heads
    k = keys.float()
    mu = mean.view(batch, kv_heads, groups, dim)
    if covariance:
        # column block g of [D, G * D] is Sigma_g / 2 (symmetric: rows or columns alike)
        halves = (0.5 * cov.float()).view(batch, kv_heads, groups, dim, dim).permute(0, 1, 3, 2, 4)
        projected = torch.baddbmm(
            mu.reshape(batch * kv_heads, 1, groups * dim),
            k.reshape(batch * kv_heads, length, dim),
            halves.reshape(batch * kv_heads, dim, groups * dim),
        ).view(batch, kv_heads, length, groups, dim)
        logits = (projected * k[:, :, :, None, :]).sum(dim=-1)  # [B, Hkv, T, G]
    else:
        logits = torch.einsum("bhtd,bhgd->bhtg", k, mu)
    logits = logits.masked_fill(~valid[:, None, :, None], float("-inf"))
    scores = torch.softmax(logits, dim=2).mean(dim=-1)
    if value_norm:
        scores = (scores + epsilon) * value_norms
    return scores * valid[:, None, :].to(scores.dtype)


def expected_attention_floor(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The floor of expected attention, what any implementation of it must compute: each query
    head's ``D x D`` second moment over all ``T`` queries (``queries[B, Hq, T, D]``), the
    quadratic form of every key with it and a softmax over the keys, ``[B, Hkv, G, T]``; no
    mean, rotation, masks or value norms (what ``benchmarks/test_compress_op.py`` times as its
    own floor: its work is not the window attention's)."""
    batch, kv_heads, length, dim = keys.shape
    q = queries.float()
    second = q.transpose(-1, -2) @ q  # [B, Hq, D, D]
    sigma = second.view(batch, kv_heads, -1, dim, dim)
    k = keys.float()[:, :, None]  # [B, Hkv, 1, T, D]
    return torch.softmax(((k @ sigma) * k).sum(dim=-1), dim=-1)

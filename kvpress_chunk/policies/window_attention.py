"""SnapKV's observation-window scores at the cost of the bare window attention.

:func:`~.scorers.observation_window_attention` returns the softmax of the window queries over
every key as a fresh ``fp32[B, Hkv, G, w, T]`` tensor, which ``SnapKVScorer.score`` then masks,
averages over the window queries, pools over tokens and averages over each GQA group: several
passes over (and allocations of) the largest tensor of the op. Everything after the softmax is
linear in the probabilities, so :func:`snapkv_scores` does:

1. one batched matmul writing the logits ``[B * Hkv, G * w, T]`` (GQA groups folded into the
   query axis, no key copies);
2. the masks as in-place edits: padding keys (only when a row has padding) and the causal rule,
   which only concerns the last ``w`` columns;
3. the softmax in place (CPU);
4. one mat-vec: the probabilities of the prefix columns weighted by ``valid query / (valid
   queries * G)``, i.e. the mean over window queries *and* over the GQA group at once;
5. the average pool on ``Hkv`` rows instead of ``Hkv * G`` (pooling and the group mean commute).

Measured at SmolLM2's layer shape, 8192 keys, window 64, 2-core CPU: the bare matmul + softmax
(the floor, :func:`window_attention_floor`) 7.7 ms, this 7.0 ms (no new tensor for the
probabilities), ``SnapKVScorer.score`` 14.8 ms eager / 15.2 ms compiled; the same algebra in
plain traceable code (:func:`snapkv_scores_traced`) 30 ms eager / 15.5 ms compiled: inductor's
generated softmax and reductions lose to ATen's here. Hence a custom op: ``torch.compile`` keeps
it opaque (the grouping and selection around it still compile). ``benchmarks/test_compress_op.py``
times it against the floor in the same run.

Equal to ``SnapKVScorer.score`` up to float rounding (sums in another order):
``tests/test_window_attention.py`` checks 1e-6 relative, padding, ``max+1`` and selections.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def _window_probs(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, softcap: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Softmax of the window ``queries[B, Hq, w, D]`` over every key, ``float32[B * Hkv, G * w, T]``
    (row ``g * w + i``: query ``i`` of head ``g`` of its KV group), written once: one batched
    matmul for the logits, then the masks (padding keys, causal inside the window) and the
    softmax in place. ``softcap``: the model's logit soft cap (Gemma 2), applied in place to
    the logits before the masks, as the model does."""
    batch, kv_heads, length, head_dim = keys.shape
    q_heads, window = queries.shape[1], queries.shape[2]
    groups = q_heads // kv_heads
    prefix = length - window
    lowest = torch.finfo(torch.float32).min
    q = queries.float().reshape(batch * kv_heads, groups * window, head_dim)
    k = keys.float().reshape(batch * kv_heads, length, head_dim)
    logits = torch.bmm(q, k.transpose(-1, -2))  # [B*Hkv, G*w, T]: the one big write
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    view = logits.view(batch, kv_heads, groups * window, length)
    if not bool(valid.all()):  # padding keys: zero weight (rows of padding queries go uniform)
        view.masked_fill_(~valid[:, None, None, :], lowest)
    causal = torch.ones(window, window, dtype=torch.bool, device=keys.device).triu(1).repeat(groups, 1)
    logits[:, :, prefix:].masked_fill_(causal, lowest)  # causal inside the window
    if logits.device.type == "cpu":
        # In place: ATen's CPU softmax reads each row (max, then exp) before writing it.
        return torch.ops.aten._softmax.out(logits, -1, False, out=logits)
    return torch.softmax(logits, dim=-1)


def _query_weighted_sum(probs: torch.Tensor, weight: torch.Tensor, kv_heads: int, columns: int) -> torch.Tensor:
    """``sum_i weight[b, i] * probs[row of query i, j]`` over the window queries of every head of
    each GQA group, for the first ``columns`` keys: one mat-vec, ``[B, Hkv, columns]``
    (``probs`` from :func:`_window_probs`, ``weight[B, w]``)."""
    batch, window = weight.shape
    groups = probs.shape[1] // window
    rows = weight[:, None, None, :].expand(batch, kv_heads, groups, window).reshape(batch * kv_heads, 1, groups * window)
    return torch.bmm(rows, probs[:, :, :columns]).view(batch, kv_heads, columns)


@torch.library.custom_op("kvpress_chunk::window_attention_sum", mutates_args=())
def window_attention_sum(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, softcap: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Attention every key gets from the valid window queries, summed over them and averaged
    over each GQA group: ``float32[B, Hkv, T]`` (observed attention's accumulation, one block of
    observers). Same kernels as :func:`snapkv_window_mass` (and opaque to ``torch.compile`` for
    the same reason), every column, no pooling."""
    _, kv_heads, length, _ = keys.shape
    window, groups = queries.shape[2], queries.shape[1] // kv_heads
    probs = _window_probs(queries, keys, valid, softcap)
    weight = valid[:, length - window :].to(torch.float32) / groups  # [B, w]: padding queries give nothing
    return _query_weighted_sum(probs, weight, kv_heads, length)


@window_attention_sum.register_fake
def _(queries, keys, valid, softcap=None):
    batch, kv_heads, length, _ = keys.shape
    return keys.new_empty(batch, kv_heads, length, dtype=torch.float32)


@torch.library.custom_op("kvpress_chunk::snapkv_window_mass", mutates_args=())
def snapkv_window_mass(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, kernel: int, softcap: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pooled attention mass ``float32[B, Hkv, T - w]`` of the prefix keys: the window queries'
    softmax probabilities averaged over the valid window queries and the GQA group, then
    average-pooled over ``kernel`` tokens (zero padding counted, as ``F.avg_pool1d``).

    A custom op on purpose: ``torch.compile`` keeps it opaque and runs these eager ATen kernels
    (one matmul writing the logits, the mask edits and the softmax in place, one mat-vec), which
    on the CPU we measured beat inductor's generated softmax and reduction (see the module
    docstring); the grouping and selection around it still compile."""
    batch, kv_heads, length, _ = keys.shape
    window, groups = queries.shape[2], queries.shape[1] // kv_heads
    prefix = length - window
    probs = _window_probs(queries, keys, valid, softcap)
    query_valid = valid[:, prefix:].to(torch.float32)  # [B, w]
    weight = query_valid / (query_valid.sum(dim=-1, keepdim=True).clamp(min=1.0) * groups)
    mass = _query_weighted_sum(probs, weight, kv_heads, prefix)  # [B, Hkv, T-w]
    pooled = F.avg_pool1d(mass.view(batch * kv_heads, 1, prefix), kernel_size=kernel, padding=kernel // 2, stride=1)
    return pooled.view(batch, kv_heads, prefix)


@snapkv_window_mass.register_fake
def _(queries, keys, valid, kernel, softcap=None):
    batch, kv_heads, length, _ = keys.shape
    return keys.new_empty(batch, kv_heads, length - queries.shape[2], dtype=torch.float32)


def window_pad_value(prefix_scores: torch.Tensor, window_scores: str) -> torch.Tensor:
    """The score given to the observation window's own tokens, broadcastable to
    ``[B, Hkv, w]``: ``0`` (``"zero"``: the selector protects them) or, for ``"max+1"``
    (kvpress), one more than the row's best prefix score. The max is per batch row, so a row
    scores the same in a padded batch as alone (a max over the batch changed which chunks tied)."""
    if window_scores == "max+1":
        return prefix_scores.amax(dim=(1, 2), keepdim=True) + 1
    return prefix_scores.new_zeros(())


def snapkv_scores(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, kernel: int = 5, window_scores: str = "zero",
    softcap: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SnapKV scores ``float32[B, Hkv, T]`` of ``keys[B, Hkv, T, D]`` seen by the (pre-scaled)
    window ``queries[B, Hq, w, D]``; ``valid[B, T]`` marks real tokens. Same contract as
    ``SnapKVScorer(window=w, kernel=kernel, window_scores=window_scores).score``."""
    batch, kv_heads = keys.shape[:2]
    pooled = snapkv_window_mass(queries, keys, valid, kernel, softcap)
    pad_value = window_pad_value(pooled, window_scores)
    return torch.cat([pooled, pad_value.expand(batch, kv_heads, queries.shape[2])], dim=-1)


def snapkv_scores_traced(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, kernel: int = 5, window_scores: str = "zero",
    softcap: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`snapkv_scores` in plain traceable tensor code (no custom op, no in-place softmax):
    the same algebra for inductor to fuse. Kept for the measurement; slower than
    :func:`snapkv_scores` on our CPU, eager or compiled."""
    batch, kv_heads, length, head_dim = keys.shape
    q_heads, window = queries.shape[1], queries.shape[2]
    groups = q_heads // kv_heads
    prefix = length - window
    q = queries.float().reshape(batch, kv_heads, groups * window, head_dim)
    k = keys.float()
    lowest = torch.finfo(torch.float32).min

    # 1. logits: prefix columns (padding only) and the window block (causal + padding)
    prefix_logits = torch.matmul(q, k[:, :, :prefix].transpose(-1, -2))  # [B, Hkv, G*w, T-w]
    if softcap is not None:
        prefix_logits = torch.tanh(prefix_logits / softcap) * softcap
    prefix_logits = prefix_logits.masked_fill(~valid[:, None, None, :prefix], lowest)
    window_logits = torch.matmul(q, k[:, :, prefix:].transpose(-1, -2))  # [B, Hkv, G*w, w]
    if softcap is not None:
        window_logits = torch.tanh(window_logits / softcap) * softcap
    causal = torch.ones(window, window, dtype=torch.bool, device=keys.device).tril()
    allowed = causal[None] & valid[:, None, prefix:]  # [B, w (queries), w (keys)]
    allowed = allowed[:, None, None].expand(batch, 1, groups, window, window).reshape(batch, 1, groups * window, window)
    window_logits = window_logits.masked_fill(~allowed, lowest)

    # 2. softmax statistics per query row
    row_max = torch.maximum(prefix_logits.amax(dim=-1), window_logits.amax(dim=-1))  # [B, Hkv, G*w]
    exp_prefix = torch.exp(prefix_logits - row_max[..., None])
    normaliser = exp_prefix.sum(dim=-1) + torch.exp(window_logits - row_max[..., None]).sum(dim=-1)

    # 3. one weighted column sum: mean over valid window queries and over the GQA group
    query_valid = valid[:, prefix:].to(torch.float32)  # [B, w]
    n_queries = query_valid.sum(dim=-1).clamp(min=1.0)  # [B]
    weight = (query_valid / n_queries[:, None])[:, None, None, :].expand(batch, 1, groups, window)
    weight = weight.reshape(batch, 1, groups * window) / (normaliser * groups)  # [B, Hkv, G*w]
    scores = torch.matmul(weight[:, :, None, :], exp_prefix)[:, :, 0]  # [B, Hkv, T-w]

    # 4. pool after the group mean (both linear: they commute)
    pooled = F.avg_pool1d(
        scores.reshape(batch * kv_heads, 1, prefix), kernel_size=kernel, padding=kernel // 2, stride=1
    ).view(batch, kv_heads, prefix)
    pad_value = window_pad_value(pooled, window_scores)
    return torch.cat([pooled, pad_value.expand(batch, kv_heads, window)], dim=-1)


def window_attention_floor(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The floor of every observation-window scorer: the bare fp32 matmul of the window queries
    over all keys and its softmax, ``[B, Hkv, G * w, T]``, no mask and no reduction (what
    ``benchmarks/test_compress_op.py`` times as the op's floor)."""
    batch, kv_heads, _, head_dim = keys.shape
    q = queries.float().reshape(batch, kv_heads, -1, head_dim)
    return torch.softmax(torch.matmul(q, keys.float().transpose(-1, -2)), dim=-1)

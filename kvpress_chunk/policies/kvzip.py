"""KVzip (arXiv 2505.23416): score the cache by how much the model needs it to *reconstruct* the
context, so the score does not depend on any question (query-agnostic by construction).

After the prefill the model reads, with the full cache as its past, a repeat prompt followed by
the context itself, teacher-forced (nothing is generated)::

    [chat prefix, context ... ] | "Repeat the previous context exactly." <assistant turn> context chunk

A token's score is the largest attention it receives from any reconstruction query, per layer
and KV head, maxed over the query heads of its GQA group. Long contexts are reconstructed in
chunks of at most ``chunk_size`` tokens; chunk ``c > 0`` is prompted with "Repeat the part ...
starting with" and the last 8 tokens of chunk ``c - 1``. The chat template's prefix (system
prompt, user turn) is not reconstructed: it scores 0 apart from the sinks, as in kvpress. The
repeat prompt ends with the template's assistant turn whenever the tokenizer has a template, also
for a context that was not formatted with it (``generate_answers(chat_template=False)``): the
press sees token ids, not how they were built; a tokenizer without a template gets a plain
newline. As in the paper (and kvpress), each chunk's queries are scored over the attention sinks, the chunk's own span of the context and the
reconstruction tokens themselves: the softmax the score is read from is over that subset.

Where this differs from kvpress' ``KVzipPress``: a left-padded batch is scored row by row
correctly (each row reconstructs its own tokens, with its own positions), the scores feed any
grouper, selector and allocator of this library (chunked KVzip, per-head or shared), and the
reconstruction runs through the base model (no LM head).

Cost: one extra forward over about as many tokens as the context (the paper: 2-3x a plain
prefill in all; here, SmolLM2 on 2 idle CPU cores, 2.54x at 1k tokens and 3.21x at 4k, against
2.36x and 3.12x for the model's own forward of the same reconstruction tokens without any
scoring: docs/benchmarks.md, "KVzip against its floor"), and the uncompressed cache is alive
until it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..registry import register
from .groupers import positions_from_row_start
from .layer_inputs import LayerInputs
from .queries import apply_softcap, logit_softcap, softcap_extra
from .scorers import Scorer, observation_window_attention, rotated_queries, window_queries
from .validation import check_bool, check_int

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP_TOKENS = 8  # tokens of the previous chunk that start the next chunk's prompt
QUERY_BLOCK = 256  # reconstruction queries scored at once (bounds the [.., q, T] fp32 transient)


class PassChunk(NamedTuple):
    """One batch of reconstruction input, right-padded: ``input_ids[B, n]``, ``valid[B, n]``
    (``False`` on padding), ``positions[B, n]`` (RoPE positions continuing each row's text) and
    the span ``[start[B], end[B])`` of the prefill's (padded) axis that this chunk reconstructs."""

    input_ids: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor


@register("scorer", "kvzip")
@dataclass(frozen=True)
class KVzipScorer(Scorer):
    """KVzip context-reconstruction scores (arXiv 2505.23416); needs one extra pass after prefill.

    ``chunk_size``: context tokens reconstructed per pass (<= 2048 in the paper); ``sinks``:
    first tokens always in the scored attention subset (keep them with the selector's ``sinks``);
    ``plus_normalization``: KVzip+ (divide each query's attention by the norm of its hidden
    state, multiply each key's by the norm of ``W_O v``, what it writes to the residual stream);
    ``window``: trailing tokens a selector with ``keep_window`` always keeps (reconstruction
    scores say nothing about what the *next* token needs: recency does); ``pool``: each token
    also takes the largest score within ``pool`` tokens on either side (0: off, the paper), so
    the neighbours of a token the reconstruction needs survive with it (a number or a name is
    several tokens; unlike fixed chunks the span is centred on the peak). Measured on the
    leaderboard's cases (SmolLM2, 2000-token prose, 2026-11-30): it does not help there, fidelity
    KL 0.112 vs 0.062 at 75% removed and 0.45-0.48 vs 0.37 at 90%, needles no better (2-3 cases
    per ratio, pool=2 lost one at 90%): off by default. ``observe=w``: the last ``w`` real
    prefill queries count as reconstruction queries too (a token's score is the largest
    attention any of them gives it, same scale as KVzip's): reconstruction says what the
    context holds, the window says what the next tokens read (the recent sentence), chosen by
    attention rather than a fixed recent span (0: off, the paper). A mean over the window
    (SnapKV's score) was tried first and never changed a selection: it is far below the
    reconstruction maxima. ``continue_positions``: each chunk's reconstruction takes the
    positions an unchunked pass would give it (its first copied token sits ``c * chunk_size``
    later than chunk 0's, whatever the length of its prompt) instead of restarting after the context (the paper's code and kvpress restart). Why: with
    restarts, the query that copies token ``p`` of chunk ``c`` sits ``T + P - c * chunk_size``
    positions after it, so later chunks are copied from closer and RoPE scores them higher; at
    4000 tokens (SmolLM2, 75% removed) the first chunk kept 18% of its tokens and the second 32%,
    and the needle at depth 0.1 was lost. Continued positions give every chunk the same copy
    distance. They reach ``2T`` plus the prompts; a chunk that would pass the model's
    ``max_position_embeddings`` moves back just enough (toward the restart) to stay inside it.
    Nothing changes for contexts of one chunk (<= ``chunk_size`` tokens). Off by default (the
    paper's method, kvpress parity). ``local``: the pass's own attention (every layer the press
    compresses) runs over the same keys the score is read from (the sinks, the chunk's span and
    the reconstruction tokens) instead of the whole context. Why: the score already ignores the
    rest, and attending to it is most of the pass's cost on long contexts (each chunk's queries
    read every context token); with ``local`` a chunk costs its own span, so smaller chunks make
    the pass cheaper. It changes the pass's hidden states (an approximation of the paper's
    method), not the scoring rule; the chat prefix is outside every span, so it is hidden from
    the pass too. Layers with a sliding window or attention sinks attend as the model does.
    Off by default.
    """

    chunk_size: int = 2048
    window: int = 0
    sinks: int = 4
    plus_normalization: bool = False
    pool: int = 0
    observe: int = 0
    continue_positions: bool = False
    local: bool = False

    context_pass = True
    rebuilds_queries = True

    def __post_init__(self) -> None:
        check_int(self, "chunk_size", minimum=OVERLAP_TOKENS + 1,
                  meaning=f"context tokens per reconstruction chunk, more than the {OVERLAP_TOKENS} that overlap")
        check_int(self, "window", minimum=0, meaning="trailing tokens a keep_window selector keeps")
        check_int(self, "sinks", minimum=0)
        check_bool(self, "plus_normalization")
        check_int(self, "pool", minimum=0, meaning="neighbours on either side; 0: off")
        check_int(self, "observe", minimum=0, meaning="last prefill queries also scored; 0: off")
        check_bool(self, "continue_positions")
        check_bool(self, "local")

    def deferred_hidden(self) -> int:
        return self.observe  # prepare() runs after the pass and projects the observed queries

    # -- the extra pass ---------------------------------------------------------------------------

    def pass_chunks(
        self, tokenizer: Any, input_ids: torch.Tensor, valid: torch.Tensor, max_positions: int | None = None
    ) -> list[PassChunk]:
        """The reconstruction inputs for a prefill of ``input_ids[B, T]`` (``valid[B, T]``).
        ``max_positions`` (the model's): ``continue_positions`` never places a chunk past it (a
        chunk without room moves back toward the restart, its copy distance shorter)."""
        from ..generation import prompt_parts

        prefix, suffix = prompt_parts(tokenizer)
        device = input_ids.device

        def encode(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False).input_ids)

        first, following, suffix_ids = encode(FIRST_PROMPT), encode(NEXT_PROMPT), encode(suffix)
        prefix_ids = encode(prefix) if prefix else []
        length = input_ids.shape[-1]
        rows = [input_ids[b][valid[b]].tolist() for b in range(input_ids.shape[0])]
        # The chat template's prefix (system prompt, user turn) is not part of the context to
        # reconstruct (as in the paper and kvpress): a row that starts with it reconstructs the rest.
        skips = [len(prefix_ids) if prefix_ids and row[: len(prefix_ids)] == prefix_ids else 0 for row in rows]
        contexts = [row[skip:] for row, skip in zip(rows, skips)]
        n_chunks = max(1, max(-(-len(context) // self.chunk_size) for context in contexts))
        chunks = []
        for c in range(n_chunks):
            lo = c * self.chunk_size
            sequences, starts, ends, shifts = [], [], [], []
            for row, skip, context in zip(rows, skips, contexts):
                part = context[lo : lo + self.chunk_size]
                prompt = first if c == 0 else following + context[max(0, lo - OVERLAP_TOKENS) : lo]
                sequences.append(prompt + suffix_ids + part if part else [])
                # continue_positions: the chunk's first copied token goes where an unchunked pass
                # puts it (after the first prompt and ``lo`` copied tokens), whatever its prompt;
                # never before the restart: a chunk shorter than its prompt's extra length (chunk
                # sizes under ~30 tokens) would start its prompt inside the context's positions
                shifts.append(max(0, lo + len(first) - len(prompt)) if self.continue_positions else 0)
                pad = length - len(row)
                starts.append(pad + skip + lo)
                ends.append(pad + skip + lo + len(part))
            width = max(len(seq) for seq in sequences)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            seq_valid = torch.zeros(len(rows), width, dtype=torch.bool)
            for b, seq in enumerate(sequences):
                ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                seq_valid[b, : len(seq)] = True
            lengths = torch.tensor([len(row) for row in rows])
            shift = torch.tensor(shifts)
            if max_positions is not None:
                # each row's own sequence must end inside the model's positions, not the batch's
                # widest (the padding after it is never attended): a row beside a longer one
                # moved back further than alone, and was scored from other positions
                own = torch.tensor([len(seq) for seq in sequences])
                shift = torch.minimum(shift, (max_positions - lengths - own).clamp(min=0))
            positions = (lengths + shift)[:, None] + torch.arange(width)[None, :]
            chunks.append(
                PassChunk(
                    ids.to(device), seq_valid.to(device), positions.to(device),
                    torch.tensor(starts, device=device), torch.tensor(ends, device=device),
                )
            )
        return chunks

    def pass_scores(
        self,
        module: torch.nn.Module,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        context_valid: torch.Tensor,
        chunk: PassChunk,
    ) -> torch.Tensor:
        """This chunk's scores ``float32[B, Hkv, T]`` for one layer (0 outside its span).

        ``hidden[B, n, H]``: the reconstruction tokens' input to the attention; ``keys`` /
        ``values`` ``[B, Hkv, T + n, D]``: the layer's cache after the pass wrote them;
        ``context_valid[B, T]``: the prefill's padding mask."""
        length = context_valid.shape[-1]
        queries = rotated_queries(module, hidden, position_embeddings).float()
        return reconstruction_attention_max(
            queries, keys.float(), context_valid, chunk.valid, chunk.start, chunk.end, self.sinks,
            softcap=logit_softcap(module),
            hidden_norm=hidden.float().norm(dim=-1) if self.plus_normalization else None,
            value_out_norm=value_output_norm(module, values[:, :, :length]) if self.plus_normalization else None,
        )

    def pass_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict,
        context_valid: torch.Tensor, chunk: PassChunk,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One layer's attention in the pass: ``(output, scores)`` when the scores come with it
        (:func:`fused_pass_attention`), ``(output, None)`` when :meth:`pass_scores` still scores
        after it (``local`` attention the fused op cannot compute), or ``None`` to let the
        model's attention run: for KVzip+ (it needs the layer's hidden states), soft-capped
        logits, sliding windows, attention sinks, dropout, and anything but float32 on the CPU."""
        scale = kwargs.get("scaling")
        if scale is None or any(kwargs.get(name) for name in ("sliding_window", "s_aux", "sinks", "dropout")):
            return None
        softcap = kwargs.get("softcap") or None
        if not self.plus_normalization and softcap is None:
            fused = fused_pass_attention(query, key, value, float(scale), context_valid, chunk, self.sinks,
                                         whole_context=not self.local)
            if fused is not None:
                return fused
        if self.local:
            return local_pass_attention(query, key, value, float(scale), context_valid, chunk, self.sinks, softcap), None
        return None

    # -- the fused op's view ----------------------------------------------------------------------

    def prepare(self, inputs: LayerInputs) -> dict[str, torch.Tensor]:
        if inputs.context_scores is None:
            raise RuntimeError(
                "the kvzip scorer scores after the prefill's reconstruction pass: apply it with "
                "`with press(model, tokenizer=...)` (Press.select alone cannot run the pass)"
            )
        extra = {"scores": inputs.context_scores}
        observed = min(self.observe, inputs.keys.shape[-2] - 1)
        if observed > 0:
            extra["window_queries"] = window_queries(inputs, observed)
            extra.update(softcap_extra(inputs.module, inputs.keys.device))
            if self.plus_normalization:
                # The observed queries count as reconstruction queries, so KVzip+ weighs them as it
                # weighs those (pass_scores): without it their raw probabilities were maxed with
                # KVzip+ scores of another scale (SmolLM2, 547 tokens: reconstruction up to 5.9,
                # observed up to 1), so the observed queries decided a layer-dependent share.
                extra["window_hidden_norm"] = inputs.hidden_states[:, -observed:].float().norm(dim=-1)
                extra["value_out_norm"] = value_output_norm(inputs.module, inputs.values)
        return extra

    def score(
        self, keys: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor, window_queries: torch.Tensor | None = None,
        softcap: torch.Tensor | None = None, window_hidden_norm: torch.Tensor | None = None,
        value_out_norm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scores = max_pool_scores(scores.float(), valid, self.pool)
        if window_queries is not None:
            scores = torch.maximum(scores, window_attention_max(window_queries, keys, valid, softcap,
                                                                window_hidden_norm, value_out_norm))
        return scores


def window_attention_max(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, softcap: torch.Tensor | None = None,
    hidden_norm: torch.Tensor | None = None, value_out_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """The largest attention each key gets from the last ``w`` prefill queries, over the query
    heads of its GQA group: ``float32[B, Hkv, T]`` (``queries[B, Hq, w, D]`` post-RoPE, scaled).
    KVzip+ (as :func:`attention_max_given_lse`): each query's probabilities divided by its
    ``hidden_norm[B, w]``, each key's multiplied by ``value_out_norm[B, Hkv, G, T]``.
    Causal inside the window; padding keys get 0; padding queries (a row shorter than the
    window) give nothing, and neither does a row's first real token: it sees only itself, so it
    would give its own key probability 1 whatever the model. :meth:`KVzipScorer.prepare` stops an
    unpadded row's window short of it (``keys.shape[-2] - 1`` queries at most); a left-padded row
    shorter than the window reached it, so a 2-token row with ``observe=2`` kept other tokens
    beside a longer row than alone (hunt round 12)."""
    batch, kv_heads, length, _ = keys.shape
    window = queries.shape[2]
    probs = observation_window_attention(queries, keys, valid, softcap)  # [B, Hkv, G, w, T]
    if hidden_norm is not None:
        probs = probs / hidden_norm.float().clamp(min=1e-6)[:, None, None, :, None]
    if value_out_norm is not None:
        probs = probs * value_out_norm.float()[:, :, :, None, :]
    past_first = valid & (valid.cumsum(dim=-1) > 1)  # real, and not the row's first real token
    real_query = past_first[:, length - window :][:, None, None, :, None]
    return probs.masked_fill(~real_query, 0.0).amax(dim=(2, 3)) * valid[:, None, :].to(probs.dtype)


def max_pool_scores(scores: torch.Tensor, valid: torch.Tensor, radius: int) -> torch.Tensor:
    """``scores[B, H, T]`` where each real token takes the largest score within ``radius``
    tokens on either side (padding neither gives nor takes a score)."""
    if radius == 0:
        return scores
    batch, heads, length = scores.shape
    real = valid[:, None, :]
    masked = scores.masked_fill(~real, float("-inf"))
    pooled = torch.nn.functional.max_pool1d(
        masked.reshape(batch * heads, 1, length), kernel_size=2 * radius + 1, stride=1, padding=radius
    ).reshape(batch, heads, length)
    return torch.where(real, pooled, scores)


MASKED = -1e30  # additive bias of a masked key: finite, so a row with no allowed key stays finite


def attention_logsumexp(
    queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, causal: bool, softcap: float | None = None
) -> torch.Tensor:
    """``logsumexp_j(q_i . k_j + bias_j)`` per query: ``[B, H, q]`` from ``queries[B, H, q, D]``,
    ``keys[B, H, K, D]`` and an additive ``bias[B, 1, 1, K]`` (``causal``: query ``i`` sees keys
    ``<= i``).

    Why: KVzip's score needs each reconstruction query's softmax normaliser and nothing else of
    its probabilities. On CPU, torch's flash-attention kernel returns it as a by-product without
    materialising the ``[q, K]`` logits (65 ms instead of ~1 s per SmolLM2 layer at 2k tokens);
    elsewhere, and for soft-capped logits (``softcap``, Gemma 2: the kernel cannot cap them), the
    logits are reduced block by block (the reference the CPU path is tested on).
    """
    if softcap is None and queries.device.type == "cpu" and queries.dtype == torch.float32 and not torch.is_grad_enabled():
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            queries, keys, keys, 0.0, causal, attn_mask=bias, scale=1.0
        )
        return lse
    return attention_logsumexp_reference(queries, keys, bias, causal, softcap)


def attention_logsumexp_reference(
    queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, causal: bool, softcap: float | None = None
) -> torch.Tensor:
    """:func:`attention_logsumexp` in plain torch, ``QUERY_BLOCK`` queries at a time."""
    n, width = queries.shape[2], keys.shape[2]
    parts = []
    for lo in range(0, n, QUERY_BLOCK):
        hi = min(n, lo + QUERY_BLOCK)
        logits = apply_softcap(torch.matmul(queries[:, :, lo:hi], keys.transpose(-1, -2)), softcap)
        if bias is not None:
            logits = logits + bias
        if causal:
            future = torch.arange(width, device=keys.device)[None, :] > torch.arange(lo, hi, device=keys.device)[:, None]
            logits = logits.masked_fill(future, MASKED)
        parts.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(parts, dim=-1)


class ScoredSubset(NamedTuple):
    """The context keys one reconstruction chunk's softmax runs over, per row: ``index[B, C]``
    (the row's sinks, then its span; clamped), ``ok[B, C]`` (``False`` on filler) and the additive
    ``bias[B, 1, 1, C]`` (0 or :data:`MASKED`)."""

    index: torch.Tensor
    ok: torch.Tensor
    bias: torch.Tensor


def scored_subset(context_valid: torch.Tensor, start: torch.Tensor, end: torch.Tensor, sinks: int) -> ScoredSubset:
    """Each row's sinks (the first ``sinks`` real tokens, when they precede the span) and its
    span ``[start, end)`` of the prefill's (left-padded) axis."""
    length = context_valid.shape[-1]
    device = context_valid.device
    first_real = length - context_valid.sum(dim=-1)  # [B] (left padding)
    span = int((end - start).max())
    sink_idx = first_real[:, None] + torch.arange(sinks, device=device)[None, :]
    sink_ok = (sink_idx < start[:, None]) & (sink_idx < length)
    span_idx = start[:, None] + torch.arange(span, device=device)[None, :]
    span_ok = span_idx < end[:, None]
    index = torch.cat([sink_idx, span_idx], dim=-1).clamp(max=length - 1)
    ok = torch.cat([sink_ok, span_ok], dim=-1)
    return ScoredSubset(index, ok, key_bias(ok))


def key_bias(ok: torch.Tensor) -> torch.Tensor:
    """The additive attention bias ``[B, 1, 1, C]`` of gathered keys ``ok[B, C]``: 0 or :data:`MASKED`."""
    return torch.zeros(ok.shape[0], 1, 1, ok.shape[1], device=ok.device).masked_fill_(~ok[:, None, None, :], MASKED)


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states[B, H, *, D]`` at ``index[B, C]`` of the token axis: ``float32[B, H, C, D]``."""
    batch, heads, _, dim = states.shape
    return states.gather(2, index[:, None, :, None].expand(batch, heads, index.shape[-1], dim)).float()


def reconstruction_attention_max(
    queries: torch.Tensor,
    keys: torch.Tensor,
    context_valid: torch.Tensor,
    query_valid: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    sinks: int,
    hidden_norm: torch.Tensor | None = None,
    value_out_norm: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Max attention each context key gets from the reconstruction queries: ``[B, Hkv, T]``.

    ``queries[B, Hq, n, D]`` (post-RoPE, scaled), ``keys[B, Hkv, T + n, D]``. Each query's softmax
    runs over its row's sinks (the first ``sinks`` real tokens, when they precede the span), its
    span ``[start, end)`` and the reconstruction tokens up to itself; padding queries contribute
    nothing. ``value_out_norm[B, Hkv, G, T]`` (KVzip+) weighs the context keys' columns.

    How: ``max_i softmax_i(j) = exp(max_i (q_i . k_j - lse_i))``. The normalisers ``lse_i`` come
    from :func:`attention_logsumexp` (context part and causal reconstruction part, combined), then
    :func:`attention_max_given_lse`. (:func:`fused_pass_attention` gets the same normalisers as a
    by-product of the model's own attention instead.)
    """
    batch, kv_heads, total, head_dim = keys.shape
    q_heads, n = queries.shape[1], queries.shape[2]
    groups, length = q_heads // kv_heads, context_valid.shape[-1]
    subset = scored_subset(context_valid, start, end, sinks)
    context_keys = gather_tokens(keys[:, :, :length], subset.index)  # [B, Hkv, C, D]
    grouped = queries.float().reshape(batch, kv_heads, groups * n, head_dim)  # head h = kv * G + g
    lse_context = attention_logsumexp(grouped, context_keys, subset.bias, causal=False, softcap=softcap)  # [B, Hkv, G * n]
    appended = keys[:, :, length:].float().repeat_interleave(groups, dim=1)  # [B, Hq, n, D]
    # Right padding: a valid query never sees a padding key under the causal mask.
    lse_appended = attention_logsumexp(queries.float().contiguous(), appended, None, causal=True, softcap=softcap)
    lse = torch.logaddexp(lse_context, lse_appended.reshape(batch, kv_heads, groups * n))
    return attention_max_given_lse(
        grouped, context_keys, lse.view(batch, kv_heads, groups, n), subset, context_valid, query_valid,
        hidden_norm, value_out_norm, softcap,
    )


def attention_max_given_lse(
    grouped: torch.Tensor,
    context_keys: torch.Tensor,
    lse: torch.Tensor,
    subset: ScoredSubset,
    context_valid: torch.Tensor,
    query_valid: torch.Tensor,
    hidden_norm: torch.Tensor | None = None,
    value_out_norm: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """:func:`reconstruction_attention_max` once each query's normaliser is known:
    ``grouped[B, Hkv, G * n, D]`` queries, ``context_keys[B, Hkv, C, D]`` (the subset's),
    ``lse[B, Hkv, G, n]``. One matmul per block of queries with ``-lse_i`` as its additive term
    and one max over the queries; the fp32 transient is ``[B, Hkv, G * QUERY_BLOCK, C]``."""
    batch, kv_heads, groups, n = lse.shape
    head_dim, width, length = grouped.shape[-1], context_keys.shape[2], context_valid.shape[-1]
    device = grouped.device
    if hidden_norm is not None:  # KVzip+: each query's probabilities divided by ||h_i||
        lse = lse + hidden_norm[:, None, None, :].float().clamp(min=1e-6).log()
    lse = lse.masked_fill(~query_valid[:, None, None, :], -MASKED)  # padding queries never win a max

    best = torch.full((batch, kv_heads, groups, width), MASKED, device=device)
    flat_keys = context_keys.transpose(-1, -2).reshape(batch * kv_heads, head_dim, width)
    grouped = grouped.reshape(batch, kv_heads, groups, n, head_dim)
    for lo in range(0, n, QUERY_BLOCK):
        hi = min(n, lo + QUERY_BLOCK)
        rows = groups * (hi - lo)
        shift = -lse[..., lo:hi].reshape(batch * kv_heads, rows, 1)
        block = grouped[:, :, :, lo:hi].reshape(batch * kv_heads, rows, head_dim)
        if softcap is None:
            shifted = torch.baddbmm(shift, block, flat_keys)  # [B * Hkv, G * q, C]: q_i . k_j - lse_i
        else:
            shifted = apply_softcap(torch.bmm(block, flat_keys), softcap) + shift
        block_best = shifted.view(batch, kv_heads, groups, hi - lo, width).amax(dim=3)
        best = torch.maximum(best, block_best)
    probs = best.exp()
    if value_out_norm is not None:
        probs = probs * value_out_norm.gather(3, subset.index[:, None, None, :].expand(batch, kv_heads, groups, width))
    best = probs.amax(dim=2) * subset.ok[:, None, :].to(probs.dtype)
    scores = best.new_zeros(batch, kv_heads, length)
    scores.scatter_reduce_(2, subset.index[:, None, :].expand(batch, kv_heads, width), best, reduce="amax")
    return scores * context_valid[:, None, :].to(scores.dtype)


def fused_pass_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    context_valid: torch.Tensor,
    chunk: PassChunk,
    sinks: int,
    whole_context: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's attention for one layer of the reconstruction pass *and* that layer's KVzip
    scores, from one set of attention calls: ``(output[B, n, Hq, D], scores[B, Hkv, T])``, or
    ``None`` where it does not apply (not a float32 CPU tensor: torch's CPU flash kernel is what
    returns the normalisers for free).

    Why: the pass attends every reconstruction query over the whole context (the model's output)
    and the score needs each query's softmax normaliser over a subset of it (sinks + span +
    reconstruction tokens); computed separately that is the model's attention with an explicit
    mask plus two more attention calls per layer (2000 tokens, SmolLM2: ~130 + ~95 ms per layer,
    the pass's largest cost). Here the context keys are split into the scored subset and the rest
    (the chat prefix, other chunks); three flash calls (subset, rest, causal reconstruction
    tokens) each return their output and log-normaliser; merged, they are the model's attention
    over everything (the same keys: every real context token and the reconstruction tokens up
    to the query), and subset + reconstruction give the score's normalisers. Tested against the
    model's own attention and :func:`reconstruction_attention_max`.

    ``query[B, Hq, n, D]`` post-RoPE, unscaled (as the model's attention function gets it);
    ``key`` / ``value`` ``[B, Hkv, T + n, D]`` (the cache after the pass appended to it).
    ``whole_context=False`` (``KVzipScorer.local``): the rest is left out, the output is
    :func:`local_pass_attention`'s.
    """
    if query.device.type != "cpu" or query.dtype != torch.float32 or torch.is_grad_enabled():
        return None
    batch, q_heads, n, head_dim = query.shape
    kv_heads, length = key.shape[1], context_valid.shape[-1]
    if key.shape[2] != length + n or q_heads % kv_heads:
        return None
    groups = q_heads // kv_heads
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    scaled = (query * scale).contiguous()
    grouped = scaled.view(batch, kv_heads, groups * n, head_dim)  # head h = kv * G + g
    subset = scored_subset(context_valid, chunk.start, chunk.end, sinks)
    subset_keys = gather_tokens(key, subset.index)
    out_subset, lse_subset = flash(grouped, subset_keys, gather_tokens(value, subset.index), 0.0, False,
                                   attn_mask=subset.bias, scale=1.0)[:2]
    parts = [(out_subset, lse_subset)]
    if whole_context:
        # The rest: real context tokens outside the subset (a stable sort puts them first, in order).
        # (filler entries of the subset repeat real indices: membership is an amax, never overwritten)
        member = torch.zeros(context_valid.shape, dtype=torch.uint8, device=query.device)
        member.scatter_reduce_(1, subset.index, subset.ok.to(torch.uint8), reduce="amax")
        outside = context_valid & (member == 0)
        rest_width = int(outside.sum(dim=-1).max())
        if rest_width:
            rest_index = torch.sort((~outside).to(torch.uint8), dim=-1, stable=True).indices[:, :rest_width]
            rest_ok = outside.gather(1, rest_index)
            parts.append(flash(grouped, gather_tokens(key, rest_index), gather_tokens(value, rest_index), 0.0, False,
                               attn_mask=key_bias(rest_ok), scale=1.0)[:2])
    appended_keys = key[:, :, length:].float().repeat_interleave(groups, dim=1)
    appended_values = value[:, :, length:].float().repeat_interleave(groups, dim=1)
    out_appended, lse_appended = flash(scaled, appended_keys, appended_values, 0.0, True, scale=1.0)[:2]
    # per query head h = kv * G + g: grouped row (kv, g * n + i) is head h's query i
    parts.append((out_appended.reshape(batch, kv_heads, groups * n, head_dim), lse_appended.reshape(batch, kv_heads, groups * n)))
    total = torch.stack([lse for _, lse in parts]).logsumexp(dim=0)
    output = sum(out * (lse - total).exp()[..., None] for out, lse in parts)
    output = output.reshape(batch, q_heads, n, head_dim).transpose(1, 2).contiguous()
    score_lse = torch.logaddexp(lse_subset, parts[-1][1]).view(batch, kv_heads, groups, n)
    scores = attention_max_given_lse(grouped, subset_keys, score_lse, subset, context_valid, chunk.valid)
    return output, scores


def local_pass_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    context_valid: torch.Tensor,
    chunk: PassChunk,
    sinks: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """One layer's attention in a ``local`` reconstruction pass, in plain torch (any device and
    dtype, soft-capped logits): each query attends to its row's sinks and span (the scored
    subset) and, causally, the reconstruction tokens up to itself. ``output[B, n, Hq, D]``;
    shapes as :func:`fused_pass_attention`. ``QUERY_BLOCK`` queries at a time (the fp32
    transient is ``[B, Hq, QUERY_BLOCK, C + n]``)."""
    batch, q_heads, n, head_dim = query.shape
    kv_heads, length = key.shape[1], context_valid.shape[-1]
    groups = q_heads // kv_heads
    subset = scored_subset(context_valid, chunk.start, chunk.end, sinks)
    keys = torch.cat([gather_tokens(key, subset.index), key[:, :, length:].float()], dim=2).repeat_interleave(groups, 1)
    values = torch.cat([gather_tokens(value, subset.index), value[:, :, length:].float()], dim=2).repeat_interleave(groups, 1)
    width = subset.index.shape[-1]
    outputs = []
    for lo in range(0, n, QUERY_BLOCK):
        hi = min(n, lo + QUERY_BLOCK)
        logits = apply_softcap(torch.matmul(query[:, :, lo:hi].float() * scale, keys.transpose(-1, -2)), softcap)
        future = torch.arange(n, device=query.device)[None, :] > torch.arange(lo, hi, device=query.device)[:, None]
        logits[..., :width] += subset.bias
        logits[..., width:] = logits[..., width:].masked_fill(future, MASKED)
        outputs.append(torch.matmul(logits.softmax(dim=-1), values))
    return torch.cat(outputs, dim=2).to(query.dtype).transpose(1, 2).contiguous()


def value_output_norm(module: torch.nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``||W_O v||`` per query head: what each value writes into the residual stream,
    ``[B, Hkv, G, T]`` (KVzip+)."""
    batch, kv_heads, length, head_dim = values.shape
    weight = module.o_proj.weight.float()  # [hidden, Hq * D]
    groups = weight.shape[1] // (kv_heads * head_dim)
    weight = weight.view(-1, kv_heads, groups, head_dim)
    out = torch.einsum("jhgi,bhti->bhgtj", weight, values.float())
    return out.norm(dim=-1)

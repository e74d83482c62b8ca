"""What a policy part may look at for one attention layer at prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerInputs:
    """Everything the hook hands to a scorer's eager ``prepare`` step.

    ``keys``/``values`` are the layer's full cache ``[B, Hkv, T, D]`` right after prefill;
    ``valid[B, T]`` is ``False`` on left padding; ``position_embeddings`` is the ``(cos, sin)``
    pair the model used (``None`` for models without RoPE); ``input_ids[B, T]`` are the prefill's
    tokens (``None`` when the model was called with ``inputs_embeds``), for groupers that cut at
    text boundaries; ``context_scores[B, Hkv, T]`` are what a scorer's extra pass over the model
    measured after the prefill (KVzip's reconstruction, :mod:`kvpress_chunk.context_pass`),
    ``None`` for scorers without one. ``projected_queries[B, T, Hq * D]`` (or wider, for a fused
    QKV projection) is the output of the layer's query projection as the prefill's own forward
    computed it, captured for scorers that read every query (``Scorer.reads_queries``) so that
    they need not project the whole prompt a second time; ``None`` otherwise.
    ``query_valid[B, n]``: which of ``hidden_states`` are real tokens when they are *not* the
    keys' last ``n`` tokens (decoding passes hand the latest generated tokens, whose slots a
    compression may have moved: :mod:`kvpress_chunk.decoding`); ``None`` at prefill, where they
    are.
    """

    module: nn.Module
    layer_idx: int
    hidden_states: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    input_ids: torch.Tensor | None = None
    context_scores: torch.Tensor | None = None
    projected_queries: torch.Tensor | None = None
    query_valid: torch.Tensor | None = None

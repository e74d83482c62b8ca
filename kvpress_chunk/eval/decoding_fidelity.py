"""Long-generation fidelity of decoding-time compression (issue 12).

For one prompt, decode ``new_tokens`` greedily with the press's prefill compression only (the
reference: the press without ``decoding``, or no press at all with ``reference="full"``), then
for each ``max_cache`` M:

* ``agreement``: fraction of the ``new_tokens`` positions where the compressed run's greedy
  token equals the reference's (free-running, so one divergence usually ends agreement);
* ``first_divergence``: index of the first differing token (``new_tokens`` if none);
* ``nll``: mean teacher-forced negative log-likelihood of the *reference* continuation under
  the compressed run (feeding the reference tokens, compressing as it goes), and ``nll_ref``
  the same under the reference run (its own greedy tokens), so ``nll - nll_ref`` is the cost;
* ``peak_cache``: the largest per-row token count of any layer seen while decoding.

Call :func:`decoding_fidelity` (returns a list of row dicts); the CLI line is left to cli.py.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..generation import greedy_continue, prefill
from ..hf.hooks import cache_keyword


@torch.inference_mode()
def _teacher_forced(model: nn.Module, context, tokens: torch.Tensor) -> float:
    """Mean NLL of ``tokens[1, K]`` fed one at a time after ``context`` (mutated)."""
    logits = context.last_logits.float()
    mask, positions = context.attention_mask, context.next_positions.to(model.device)
    total = 0.0
    kw = cache_keyword(model)
    for step in range(tokens.shape[1]):
        token = tokens[:, step : step + 1].to(model.device)
        total += float(-torch.log_softmax(logits, dim=-1).gather(-1, token).sum())
        if step == tokens.shape[1] - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(input_ids=token, attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                    logits_to_keep=1, **{kw: context.cache})
        positions = positions + 1
        logits = out.logits[:, -1].float()
    return total / tokens.shape[1]


def decoding_fidelity(
    model: nn.Module,
    input_ids: torch.Tensor,
    press: Any = "chunkkv",
    max_caches: Sequence[int] = (128, 256, 512),
    every: int = 64,
    new_tokens: int = 512,
    protect_prompt: bool = False,
    reference: str = "prefill",
    **press_settings: Any,
) -> list[dict[str, Any]]:
    """Rows ``{"max_cache", "agreement", "first_divergence", "nll", "nll_ref", "peak_cache"}``.

    ``input_ids[1, T]``: the prompt (batch 1). ``press``: a preset / spec / Press; its prefill
    compression applies to every run; ``reference="full"`` compares against no press at all.
    """
    from ..spec import make_press

    base = make_press(press, **press_settings).replace(decoding=None)
    ref_press = None if reference == "full" else base

    def run(p, forced: torch.Tensor | None = None):
        from ..generation import applied

        with applied(p, model):
            from ..session import active_session

            context = prefill(model, input_ids, None)
            first = context.last_logits.argmax(dim=-1, keepdim=True)
            if forced is not None:
                nll = _teacher_forced(model, context, forced)
                session = active_session(model)
                peak = session.decoder.max_seen if session is not None and session.decoder else None
                return nll, peak
            rest = greedy_continue(model, context, first, new_tokens - 1)
            return torch.cat([first, rest], dim=-1)

    reference_tokens = run(ref_press)
    nll_ref, _ = run(ref_press, reference_tokens)
    rows = []
    for m in max_caches:
        p = base.replace(decoding={"every": every, "max_cache": m, "protect_prompt": protect_prompt})
        tokens = run(p)
        same = (tokens[0] == reference_tokens[0, : tokens.shape[1]]).tolist()
        first_div = same.index(False) if False in same else len(same)
        nll, peak = run(p, reference_tokens)
        rows.append({
            "press": base.name, "max_cache": m, "every": every, "new_tokens": new_tokens,
            "agreement": sum(same) / len(same), "first_divergence": first_div,
            "nll": nll, "nll_ref": nll_ref, "peak_cache": peak,
        })
    return rows

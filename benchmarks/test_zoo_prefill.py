"""What the query-agnostic scorer zoo costs at prefill, as ratios to a plain prefill (same run).

Each case is a whole prefill of the embedded SmolLM2 (one forward from an empty cache, last
logits only) with the press applied at 75% removed, against the plain prefill of the same run
(``reading="overhead"``), plus its peak memory (resident-memory high-water mark above the level
before the call) and the cache left. The issue's goals, reported here and not asserted (timed
assertions are flaky on shared machines): scorers without an extra pass <= 5% over a plain
prefill; ``kvzip`` (one reconstruction pass) <= 2.2x. kvpress' nearest presses run the same
prefill where they exist (batch 1, as kvpress supports).

``kvzip floor`` is the plain prefill plus the model's own forward of the same reconstruction
chunks (same tokens, positions and full cache as past; no scoring, no selection): what reading
KVzip's tokens costs the model before any scoring. By arithmetic the ratio of any exact KVzip to
the plain prefill is at least ``2 + (1 + chunk / T) * a`` at the prefill's cost per query-key pair, ``a``
being attention's share of a prefill: the chunk's queries attend the whole context and, causally,
each other, against ``T / 2`` keys per query in a causal prefill. So the 2.2x goal is below exact
KVzip's floor wherever attention is more than 10-13% of a prefill (SmolLM2 on CPU: 20% at 1k
tokens, 44% at 4k); the row shows by how much, and ``kvzip`` / ``kvzip floor`` is what the press
itself adds (its scores).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpress_chunk as kc
from kvpress_chunk.policies.kvzip import KVzipScorer
from workloads import cache_bytes, peak_rss_growth, prompt_ids, run_prefill, smoke_only, smollm2

RATIO = 0.75
OURS = ["expected-attention", "keydiff", "tova", "observed", "chunkkv-entropy", "kvzip", "chunkkv-kvzip"]
KVPRESS = {
    "kvpress KVzipPress": lambda kvpress: kvpress.KVzipPress(compression_ratio=RATIO),
    "kvpress ExpectedAttentionPress": lambda kvpress: kvpress.ExpectedAttentionPress(compression_ratio=RATIO),
    "kvpress KeyDiffPress": lambda kvpress: kvpress.KeyDiffPress(compression_ratio=RATIO),
}


KVZIP_FLOOR = "kvzip floor"


def prefill_and_plain_pass(model, tokenizer, ids: torch.Tensor) -> DynamicCache:
    """A plain prefill, then the forward KVzip's pass makes (its chunks, positions and masks),
    without scores; the cache is put back after each chunk, as the pass does."""
    cache = run_prefill(model, ids, None)
    valid = torch.ones_like(ids, dtype=torch.bool)
    chunks = KVzipScorer().pass_chunks(tokenizer, ids, valid, model.config.max_position_embeddings)
    saved = [(layer.keys, layer.values) for layer in cache.layers]
    with torch.inference_mode():
        for chunk in chunks:
            model.base_model(input_ids=chunk.input_ids, attention_mask=torch.cat([valid, chunk.valid], dim=-1).long(),
                             position_ids=chunk.positions, past_key_values=cache, use_cache=True)
            for layer, (keys, values) in zip(cache.layers, saved):
                layer.keys, layer.values = keys, values
    return cache


def build(name: str, tokenizer):
    if name in ("none", KVZIP_FLOOR):
        return None
    if name in KVPRESS:
        return KVPRESS[name](pytest.importorskip("kvpress", reason="kvpress (extra 'oracle') is not installed"))
    press = kc.make_press(name, compression_ratio=RATIO)
    if press.scorer.context_pass:
        return lambda model: press(model, tokenizer=tokenizer)
    return press


CASES = [smoke_only(512, "kvzip"), smoke_only(512, KVZIP_FLOOR)] + [(length, name) for length in (1024, 4096) for name in ["none", KVZIP_FLOOR, *OURS, *KVPRESS]]


@pytest.mark.parametrize("length, name", CASES)
def test_zoo_prefill_cost(benchmark, length, name):
    model, tokenizer = smollm2()
    ids = prompt_ids(length)
    press = build(name, tokenizer)
    run = (lambda: prefill_and_plain_pass(model, tokenizer, ids)) if name == KVZIP_FLOOR else (lambda: run_prefill(model, ids, press))
    cache = run()  # check, and warm-up
    kept = cache.get_seq_length()
    facts = {}
    if name == "kvpress KVzipPress":
        # kvpress' KVzip (not layerwise) hides the evicted tokens behind per-head masks
        # (AdaKV-style ``masked_key_indices``) and keeps the cache full length: check the masks.
        masked = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
        hidden = sum(int(m[0].numel()) for m in masked if m is not None)
        heads = model.config.num_key_value_heads * len(model.model.layers)
        assert kept == length and hidden >= RATIO * length * heads * 0.9, (kept, hidden)
        facts["hidden, not evicted"] = f"{hidden / heads:.0f} tokens per head"
    else:
        assert kept == length if press is None else kept < length
    peak, _ = peak_rss_growth(run)
    benchmark.group = f"zoo prefill, SmolLM2, {length} tokens, 75% removed"
    benchmark.extra_info.update(
        label="no press (plain prefill)" if name == "none" else name, baseline=name == "none", reading="overhead",
        facts={"peak MB": f"{peak / 1e6:.0f}", "cache MB": f"{cache_bytes(cache) / 1e6:.1f}", **facts},
    )
    benchmark.pedantic(run, rounds=2, iterations=1)

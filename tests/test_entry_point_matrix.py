"""Silent wrong results on the library's entry points: every way a forward can meet a compressed
cache either gives the answer the uncompressed coordinates call for, or is refused with an error.

The oracles: a padded batch row equals the row alone; a refused case names what to do instead;
what continues a compressed cache correctly (our loop, ``model.generate`` from the prompt) keeps
working.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

import kvpress_chunk as kc
from kvpress_chunk.generation import CompressedContext, greedy_continue, new_cache, prefill, teacher_forced_logits
from kvpress_chunk.hf.hooks import cache_keyword
from tiny_models import make_tiny_model


@pytest.fixture(autouse=True)
def _quiet_and_roomy():
    with torch._dynamo.config.patch(recompile_limit=64), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no layer was compressed")
        warnings.filterwarnings("ignore", ".*deprecated.*")
        yield


def ids_of(length, seed=0, batch=1):
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, seed=0):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = []
    for r, n in enumerate(lengths):
        row = ids_of(n, seed + n)[0]
        rows.append(row)
        ids[r, width - n:] = row
        mask[r, width - n:] = 1
    return ids, mask, rows


def chunkkv(**changes):
    return kc.make_press("chunkkv", **{"compression_ratio": 0.75, "compile": False, **changes})


GEN = dict(do_sample=False, pad_token_id=0)


# -- 1. forwards that do not continue a compressed cache -------------------------------------------


def test_generate_on_a_cache_compressed_by_an_earlier_forward_is_refused():
    """generate slices the prompt at cache.get_seq_length(): on an evicted cache it would feed
    the prompt's tail again after the kept tokens."""
    model = make_tiny_model("llama")
    ids = ids_of(100, 1)
    question = torch.cat([ids, ids_of(4, 9)], dim=-1)
    for prompt in (ids, question):
        cache = new_cache(model)
        with chunkkv()(model), torch.no_grad():
            model(ids, **{cache_keyword(model): cache})
            with pytest.raises(ValueError, match="does not continue the compressed cache"):
                model.generate(prompt, **{cache_keyword(model): cache}, max_new_tokens=3, **GEN)


def test_generate_on_a_mask_mode_cache_continues_it_like_our_loop():
    """Mask mode keeps every slot, so generate's slicing is right: allowed, and exact."""
    model = make_tiny_model("llama")
    ids, asked = ids_of(100, 1), ids_of(4, 9)
    with chunkkv(apply="mask")(model), torch.no_grad():
        context = prefill(model, ids)
        fresh = context.copy()
        out = model.generate(
            torch.cat([ids, asked], -1), **{cache_keyword(model): context.cache}, max_new_tokens=4,
            return_dict_in_generate=True, output_logits=True, **GEN,
        )
        got = torch.stack(out.logits, 1)
        fed = torch.cat([asked, out.sequences[:, 104:-1]], -1)
        want = teacher_forced_logits(model, fresh, fed)[:, 3:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_cache_compressed_in_an_earlier_press_block_is_checked_in_the_next():
    model = make_tiny_model("llama")
    ids = ids_of(100, 1)
    cache = new_cache(model)
    with chunkkv()(model), torch.no_grad():
        model(ids, **{cache_keyword(model): cache})
    with chunkkv()(model), torch.no_grad():
        with pytest.raises(ValueError, match="does not continue the compressed cache"):
            model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=3, **GEN)


def test_generate_again_on_the_cache_it_returned_is_refused():
    model = make_tiny_model("llama")
    ids = ids_of(100, 1)
    with chunkkv()(model), torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, **GEN)
        with pytest.raises(ValueError, match="does not continue the compressed cache"):
            model.generate(out.sequences, **{cache_keyword(model): out.past_key_values}, max_new_tokens=3, **GEN)


@pytest.mark.parametrize("how", ["assistant", "prompt_lookup"])
def test_speculative_generation_that_crops_a_compressed_cache_is_refused(how):
    model = make_tiny_model("llama")
    ids = ids_of(100, 1)
    extra = {"assistant_model": make_tiny_model("llama", seed=1)} if how == "assistant" else {"prompt_lookup_num_tokens": 3}
    with chunkkv()(model), torch.no_grad():
        with pytest.raises(ValueError, match="does not continue the compressed cache"):
            model.generate(ids, max_new_tokens=12, **extra, **GEN)


def test_cropping_a_compressed_cache_by_hand_is_refused():
    model = make_tiny_model("llama")
    ids = ids_of(100, 1)
    with chunkkv()(model), torch.no_grad():
        context = prefill(model, ids)
        greedy_continue(model, context, torch.tensor([[5, 6, 7]]), 2)
        context.cache.crop(-2)
        with pytest.raises(ValueError, match="does not continue the compressed cache"):
            greedy_continue(model, context, torch.tensor([[5]]), 1)


def test_continuing_a_compressed_cache_correctly_still_works():
    """Our loop after generate-style steps, and one forward per token by hand, equal generate."""
    model = make_tiny_model("llama")
    ids, mask, _ = left_padded([120, 70], seed=2)
    press = chunkkv()
    with press(model), torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)[:, ids.shape[1]:]
        context = prefill(model, ids, mask)
        first = context.last_logits.argmax(dim=-1, keepdim=True)
        got = torch.cat([first, greedy_continue(model, context, first, 5)], dim=-1)
    assert torch.equal(got, want)


# -- 2. the whole-cache stage on short contexts ----------------------------------------------------


@pytest.mark.parametrize("length", [5, 20, 32])
@pytest.mark.parametrize("budget", [{"compression_ratio": 0.9}, {"budget": 4}])
def test_the_global_allocator_keeps_a_context_within_the_window_whole(length, budget):
    model = make_tiny_model("llama")
    press = kc.make_press("chunkkv-global", compile=False, **budget)  # window 32
    ids = ids_of(length, length)
    with press(model) as session:
        context = prefill(model, ids)
    assert len(session.selections) == 4
    assert all(int(s.kept_per_row[0]) == length for s in session.selections.values())
    plain = prefill(model, ids)
    assert torch.equal(context.last_logits, plain.last_logits)


def test_the_global_allocator_keeps_short_rows_of_a_padded_batch_whole():
    model = make_tiny_model("llama")
    press = kc.make_press("chunkkv-global", compression_ratio=0.9, compile=False)
    ids, mask, rows = left_padded([30, 12], seed=4)
    with press(model) as session:
        prefill(model, ids, mask)
    assert all(s.kept_per_row.tolist() == [30, 12] for s in session.selections.values())


# -- 3. kept_per_row over every compressed layer and head --------------------------------------------


@pytest.mark.parametrize("preset", ["pyramidkv", "chunkkv-adaptive", "chunkkv-global"])
def test_kept_per_row_is_the_mean_over_compressed_layers_and_heads(preset):
    model = make_tiny_model("llama", num_layers=6)
    press = kc.make_press(preset, compression_ratio=0.5, compile=False)
    ids, mask, _ = left_padded([200, 140], seed=5)
    context = prefill(model, ids, mask, press)
    per_layer = torch.stack([
        view.visible.sum(dim=-1).float().mean(dim=1) for view in context.layer_views.values()
    ])  # [layers, B]
    assert torch.equal(context.kept_per_row(), per_layer.mean(dim=0).round().long())
    if preset == "pyramidkv":  # the first layer keeps more than the mean: that was the old answer
        assert bool((per_layer[0] > per_layer.mean(dim=0)).all())
    # the press' budget per row and head, on average (+-1: rounding of per-layer budgets)
    want = torch.tensor([press.rule.kept(200), press.rule.kept(140)])
    assert bool(((context.kept_per_row() - want).abs() <= 1).all())


def test_kept_per_row_without_compression_is_the_real_tokens():
    model = make_tiny_model("llama")
    ids, mask, _ = left_padded([50, 20])
    assert prefill(model, ids, mask).kept_per_row().tolist() == [50, 20]


# -- 4. cache layers that cannot be evicted in place -------------------------------------------------


@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_generate_with_a_static_cache_under_a_press_is_refused(mode):
    model = make_tiny_model("llama")
    with chunkkv(apply=mode)(model), torch.no_grad():
        with pytest.raises(TypeError, match="StaticLayer"):
            model.generate(ids_of(100), max_new_tokens=3, cache_implementation="static", **GEN)


def test_a_static_cache_passed_to_a_forward_under_a_press_is_refused():
    from transformers import StaticCache

    model = make_tiny_model("llama")
    cache = StaticCache(config=model.config, max_cache_len=128)
    with chunkkv()(model), torch.no_grad():
        with pytest.raises(TypeError, match="DynamicCache"):
            model(ids_of(100), **{cache_keyword(model): cache})


def test_a_quantized_cache_layer_under_a_press_is_refused():
    """No quantization backend is installed here: a DynamicCache whose layers claim to be quantized."""
    from transformers.cache_utils import QuantizedLayer

    class FakeQuantizedLayer(QuantizedLayer):
        def __init__(self):  # skips the backend checks
            self.keys = self.values = None
            self.is_initialized, self.cumulative_length = False, 0

        def _quantize(self, tensor, axis):
            return tensor

        def _dequantize(self, tensor):
            return tensor

    model = make_tiny_model("llama")
    cache = new_cache(model)
    cache.layers = [FakeQuantizedLayer() for _ in range(4)]
    with chunkkv()(model), torch.no_grad():
        with pytest.raises(TypeError, match="QuantizedLayer"):
            model(ids_of(100), **{cache_keyword(model): cache})


# -- 5. the base model (no LM head) under a press ----------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_the_base_model_on_a_padded_batch_compresses_each_row_like_alone(family, mode):
    model = make_tiny_model(family, sliding_window=32) if family == "gemma3" else make_tiny_model(family)
    press = chunkkv(apply=mode)
    ids, mask, rows = left_padded([130, 70], seed=6)
    kw = cache_keyword(model)

    def run(ids, mask):
        cache = new_cache(model)
        with press(model) as session, torch.no_grad():
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{kw: cache})
            hidden = [out.last_hidden_state[:, -1]]
            step = torch.full((ids.shape[0], 1), 7)
            for _ in range(3):  # decode through the base model too
                mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
                position_ids = position_ids[:, -1:] + 1
                out = model.model(input_ids=step, attention_mask=mask, position_ids=position_ids, use_cache=True, **{kw: cache})
                hidden.append(out.last_hidden_state[:, -1])
        return torch.stack(hidden, 1), dict(session.selections)

    batched, selections = run(ids, mask)
    assert selections, "the base model's prefill was compressed"
    for r, row in enumerate(rows):
        alone, alone_selections = run(row[None], torch.ones(1, len(row), dtype=torch.long))
        offset = ids.shape[1] - len(row)
        for idx, selection in selections.items():
            kept = selection.indices[r][selection.slot_valid[r]] - offset
            want = alone_selections[idx].indices[0][alone_selections[idx].slot_valid[0]]
            assert torch.equal(kept, want), f"{family}/{mode} layer {idx} row {r}"
        torch.testing.assert_close(batched[r], alone[0], atol=1e-4, rtol=1e-4)


def test_the_base_model_and_the_lm_model_compress_alike():
    model = make_tiny_model("llama")
    ids, mask, _ = left_padded([110, 60], seed=8)
    with chunkkv()(model) as session, torch.no_grad():
        model.model(input_ids=ids, attention_mask=mask, **{cache_keyword(model): new_cache(model)})
        via_base = {i: (s.indices.clone(), s.slot_valid.clone()) for i, s in session.selections.items()}
        model(input_ids=ids, attention_mask=mask, **{cache_keyword(model): new_cache(model)})
        via_lm = {i: (s.indices.clone(), s.slot_valid.clone()) for i, s in session.selections.items()}
    assert via_base.keys() == via_lm.keys()
    assert all(torch.equal(via_base[i][k], via_lm[i][k]) for i in via_lm for k in (0, 1))


# -- 6. chunked prefill ------------------------------------------------------------------------------


def test_generate_with_chunked_prefill_under_a_press_is_refused():
    model = make_tiny_model("llama")
    with chunkkv()(model), torch.no_grad():
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            model.generate(ids_of(100), max_new_tokens=3, prefill_chunk_size=32, **GEN)


def test_generate_with_a_prefill_chunk_larger_than_the_prompt_runs_as_one_prefill():
    model = make_tiny_model("llama")
    ids = ids_of(100)
    with chunkkv()(model), torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, **GEN)
        got = model.generate(ids, max_new_tokens=4, prefill_chunk_size=128, **GEN)
    assert torch.equal(got, want)


# -- more entry points: beam search, inputs_embeds, sliding-window models ---------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("how", ["beams", "inputs_embeds"])
def test_generate_with_beams_or_embeddings_on_a_padded_batch_gives_each_row_its_answer_alone(family, mode, how):
    """Beam search reorders cache rows (within a prompt's beams, whose views are equal); a prompt
    given as embeddings has no token ids: both keep a padded row equal to the row alone."""
    model = make_tiny_model(family, sliding_window=32) if family == "gemma3" else make_tiny_model(family)
    press = chunkkv(compression_ratio=0.7, apply=mode)
    ids, mask, rows = left_padded([150, 60], seed=3)

    def gen(ids, mask):
        out = dict(max_new_tokens=5, return_dict_in_generate=True, output_scores=True, **GEN)
        if how == "beams":
            return model.generate(ids, attention_mask=mask, num_beams=3, **out)
        return model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, **out)

    with press(model), torch.no_grad():
        batched = gen(ids, mask)
        for r, row in enumerate(rows):
            alone = gen(row[None], torch.ones(1, len(row), dtype=torch.long))
            assert torch.equal(batched.sequences[r, -5:], alone.sequences[0, -5:])
            if how == "inputs_embeds":
                for b, a in zip(batched.scores, alone.scores):
                    torch.testing.assert_close(b[r], a[0], atol=1e-5, rtol=1e-5)


# -- a compressed cache continued outside the press ------------------------------------------------


@pytest.mark.parametrize("apply,lengths", [("evict", (80, 61)), ("mask", (80,)), ("mask", (80, 61))],
                         ids=["evict-padded", "mask", "mask-padded"])
def test_a_compressed_cache_continued_outside_the_press_is_refused(apply, lengths):
    """After the ``with`` block no hook hides padding and evicted / hidden slots or gives new
    tokens their original positions: a plain forward or ``model.generate`` there would answer
    wrongly without an error (kvpress users do this), so such a cache refuses to grow."""
    from kvpress_chunk.session import ContinuationError

    model = make_tiny_model("llama", num_layers=2)
    ids, mask, _ = left_padded(lengths)
    with chunkkv(apply=apply)(model), torch.no_grad():
        context = prefill(model, ids, attention_mask=mask)
    question = ids_of(3, seed=5, batch=len(lengths))
    with chunkkv(apply=apply)(model), torch.no_grad():
        expected = greedy_continue(model, context.copy(), question, 4)
    copied = context.copy()
    with torch.no_grad(), pytest.raises(ContinuationError, match="outside the press"):
        model(question, **{cache_keyword(model): context.cache})
    with torch.no_grad(), pytest.raises(ContinuationError, match="outside the press"):
        model.generate(torch.cat([ids, question], dim=-1), attention_mask=torch.cat([mask, torch.ones_like(question)], -1),
                       max_new_tokens=2, **{cache_keyword(model): copied.cache}, **GEN)  # copies stay guarded
    # Our loop routes the compressed context itself, inside or outside a press block: same answer.
    assert torch.equal(greedy_continue(model, context.copy(), question, 4), expected)


def test_an_unpadded_evicted_cache_continued_outside_the_press_warns_once():
    """Right only if the caller passes positions continuing the original text (the documented
    kvpress-style use, tests/test_models.py), which the cache cannot see: a warning, once."""
    model = make_tiny_model("llama", num_layers=2)
    with chunkkv()(model), torch.no_grad():
        context = prefill(model, ids_of(80))
    step = ids_of(1, seed=3)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="outside the press"):
        model(step, position_ids=torch.tensor([[80]]), **{cache_keyword(model): context.cache})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(step, position_ids=torch.tensor([[81]]), **{cache_keyword(model): context.cache})


# -- 5. tokens appended to a cache no press prefilled ----------------------------------------------


def test_a_document_appended_to_a_prefix_cached_without_the_press_warns_that_it_stays_whole():
    """A system prompt cached without the press, then the document under it: the press compresses
    a prefill from an empty cache only, so the document is kept whole. Right answers, no memory
    saved: said once, not silently."""
    from kvpress_chunk.session import UncompressedAppendWarning

    model = make_tiny_model("llama", num_layers=2)
    prefix, document = ids_of(20, 1), ids_of(100, 2)
    kw = lambda cache: {cache_keyword(model): cache}  # noqa: E731
    with torch.no_grad():
        cache = new_cache(model)
        model(prefix, **kw(cache))
        with chunkkv()(model):
            with pytest.warns(UncompressedAppendWarning, match="100 tokens are appended"):
                model(document, **kw(cache))
            assert cache.get_seq_length() == 120  # nothing was compressed
            with warnings.catch_warnings():
                warnings.simplefilter("error", UncompressedAppendWarning)
                model(ids_of(5, 3), **kw(cache))  # once per press block


@pytest.mark.parametrize("ratio", [0.75, 0.0])
def test_a_question_after_a_context_prefilled_under_the_press_is_not_warned_about(tmp_path, ratio):
    """The usual flow (context under the press, then questions on copies, or on a saved and
    reloaded context) appends to a cache the press prefilled: no warning, compressed or keep-all."""
    from kvpress_chunk.session import UncompressedAppendWarning

    model = make_tiny_model("llama", num_layers=2)
    press = chunkkv(compression_ratio=ratio)
    question = ids_of(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncompressedAppendWarning)
        with press(model), torch.no_grad():
            context = prefill(model, ids_of(100, 2))
            greedy_continue(model, context.copy(), question, 3)
            path = context.save(tmp_path / "context.safetensors", model, press)
            greedy_continue(model, CompressedContext.load(path, model), question, 3)
            out = model(question, **{cache_keyword(model): context.copy().cache},
                        position_ids=torch.arange(100, 106)[None])
    assert out.logits.shape[1] == 6

"""Decoding after compression through every entry point: ``model.generate``, our loop, padded
batches, sliding-window models (Gemma 2/3, Mistral), both apply modes, both cache spellings.

The oracles: a padded batch row equals the same row alone; ``generate`` equals our loop; a press
that keeps everything equals no press (so the substituted masks are exactly the model's own);
mask mode equals evict mode.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

import kvpress_chunk as kc
from kvpress_chunk.generation import greedy_continue, new_cache, prefill
from kvpress_chunk.hf.hooks import CacheNotFoundError, UnsupportedModelError, cache_keyword
import tiny_models
from tiny_models import make_auto_tiny_model, make_tiny_model

@pytest.fixture(autouse=True)
def _room_for_test_shapes():
    # Mask mode compiles flex per head layout and scale: these tests sweep more model shapes
    # than one serving process meets (the bound per shape is pinned in test_flex.py).
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


SLIDING = ("gemma2", "gemma3", "qwen2-sliding")  # sliding-window and full-attention layers mixed
FAMILIES = ("llama", "qwen3", "mistral-sliding") + SLIDING


def tiny(family: str, window: int = 32, layers: int = 4):
    if family == "mistral-sliding":  # every layer slides: nothing to compress (and a warning says so)
        return make_tiny_model("mistral", num_layers=layers, sliding_window=window)
    if family == "qwen2-sliding":  # full attention below max_window_layers, sliding above
        return make_tiny_model("qwen2", num_layers=layers, sliding_window=window, use_sliding_window=True, max_window_layers=2)
    if family in ("gemma2", "gemma3"):
        return make_tiny_model(family, num_layers=layers, sliding_window=window)
    return make_tiny_model(family, num_layers=layers)


def left_padded(lengths, seed=0, vocab=120):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    rows = []
    for r, n in enumerate(lengths):
        row = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed + n))
        rows.append(row)
        ids[r, width - n:] = row
        mask[r, width - n:] = 1
    return ids, mask, rows


def generate(model, ids, mask=None, press=None, new=6):
    with torch.no_grad(), kc.generation.applied(press, model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no layer was compressed")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_a_padded_batch_gives_each_row_its_answer_alone(family, mode):
    model = tiny(family)
    press = kc.make_press("chunkkv", compression_ratio=0.7, compile=False, apply=mode)
    ids, mask, rows = left_padded([150, 60])
    batched = generate(model, ids, mask, press)
    for r, row in enumerate(rows):
        alone = generate(model, row[None], None, press)
        assert torch.equal(batched[r], alone[0]), f"{family}/{mode} row {r}: {batched[r].tolist()} vs {alone[0].tolist()}"
    # Our own loop gives generate's tokens too (same feed: no question, the prompt's last logits first).
    with press(model):
        context = prefill(model, ids, mask)
        first = context.last_logits.argmax(dim=-1, keepdim=True)
        rest = greedy_continue(model, context, first, max_new_tokens=5)
    assert torch.equal(torch.cat([first, rest], dim=-1), batched)


@pytest.mark.parametrize("family", FAMILIES)
def test_evict_and_mask_mode_generate_the_same_tokens(family):
    """The same selection, two layouts: mask mode keeps every slot (the cache's lengths stay the
    text's), evict mode shortens the compressed layers. On transformers 5.3 up to the release
    with ``Cache.get_query_offset`` the masks place queries at the *first* layer's length: a
    compressed first layer (Qwen2, full layers below sliding ones) gave the sliding layers masks
    for the wrong positions, alone and in a padded batch alike (so the row-alone oracle agreed)."""
    model = tiny(family)
    ids, mask, rows = left_padded([150, 60])
    for inputs, attention in ((ids, mask), (rows[0][None], None)):
        out = {
            mode: generate(model, inputs, attention, kc.make_press("chunkkv", compression_ratio=0.7, compile=False, apply=mode))
            for mode in ("evict", "mask")
        }
        assert torch.equal(out["evict"], out["mask"]), f"{family} batch {inputs.shape[0]}: {out}"


@pytest.mark.parametrize("family", SLIDING + ("llama",))
@pytest.mark.parametrize("window", [16, 48])
@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_a_press_that_keeps_everything_decodes_exactly_like_no_press(family, window, mode):
    """Padded batch, contexts longer than the sliding window: the compressed layers' substituted
    masks must be exactly the model's own (a wrong mask on any layer type shows in the logits)."""
    model = tiny(family, window=window)
    keep_all = kc.make_press("snapkv", budget=10_000, compile=False, apply=mode)
    ids, mask, _ = left_padded([130, 75, 40], seed=3)
    question = torch.tensor([[11, 12, 13]] * 3)
    logits = {}
    for name, press in (("none", None), ("keep-all", keep_all)):
        context = prefill(model, ids, mask, press)
        if press is not None:
            assert context.layer_views, "the keep-all press registers views for its layers"
        steps = []
        with kc.generation.applied(press, model):
            for step in range(4):
                tokens = greedy_continue(model, context, question if step == 0 else tokens[:, -1:], 1)
                steps.append(context.last_logits if step == 0 else tokens)
        logits[name] = torch.cat([s.float().reshape(3, -1) for s in steps[1:]], dim=-1)
    assert torch.equal(logits["none"], logits["keep-all"])


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_models_answer_alike_through_our_loop_and_generate(family):
    """The Gemma 3 defect: our loop passed the compressed layers' slot mask to every layer, so
    sliding-window layers (whose cache follows the original text) attended to the wrong slots."""
    model = tiny(family, window=32)
    ids = torch.randint(3, 120, (1, 180), generator=torch.Generator().manual_seed(7))
    for ratio in (0.5, 0.9):
        press = kc.make_press("chunkkv", compression_ratio=ratio, compile=False)
        with press(model) as session:
            context = prefill(model, ids)
            first = context.last_logits.argmax(dim=-1, keepdim=True)
            ours = torch.cat([first, greedy_continue(model, context, first, max_new_tokens=7)], dim=-1)
        assert session.skipped_layers and session.selections, "the model mixes sliding and compressed layers"
        assert torch.equal(ours, generate(model, ids, None, press, new=8)), f"{family} r={ratio}"


def test_decoding_a_copied_context_after_the_press_block_uses_its_views():
    model = tiny("gemma3")
    ids, mask, _ = left_padded([120, 50], seed=5)
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False)
    question = torch.tensor([[9, 8, 7]] * 2)
    with press(model):
        context = prefill(model, ids, mask)
        inside = greedy_continue(model, context.copy(), question, 5)
    outside = greedy_continue(model, context.copy(), question, 5)  # no press applied any more
    assert torch.equal(inside, outside)
    assert model.config._attn_implementation == "sdpa"


def test_the_cache_keyword_of_either_transformers_line_is_found():
    """transformers 5.2x passes ``cache=``, earlier releases ``past_key_values=``: both compress."""
    model = tiny("llama")
    ids = torch.randint(3, 120, (1, 100), generator=torch.Generator().manual_seed(1))
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False)
    for keyword in {cache_keyword(model), "past_key_values"}:
        cache = new_cache(model)
        with press(model), torch.no_grad():
            model(ids, **{keyword: cache})
        assert all(layer.keys.shape[-2] == 32 for layer in cache.layers), keyword  # the window: 32 > 25


def test_a_layer_called_without_a_findable_cache_is_an_error_not_a_silent_pass_through():
    model = tiny("llama")
    attention = kc.find_attention_layers(model)[1][1]

    def hide_cache(module, args, kwargs):  # what a transformers release with a new spelling looks like
        kwargs = {("kv_store" if k in ("cache", "past_key_values") else k): v for k, v in kwargs.items()}
        return args, kwargs

    original_forward = attention.forward
    attention.forward = lambda *a, kv_store=None, **k: original_forward(*a, **k)
    handle = attention.register_forward_pre_hook(hide_cache, with_kwargs=True)
    try:
        with pytest.raises(CacheNotFoundError, match="layer 1.*without a cache argument"):
            with kc.make_press("chunkkv", compression_ratio=0.5, compile=False)(model), torch.no_grad():
                model(torch.randint(3, 120, (1, 80)), **{cache_keyword(model): new_cache(model)})
    finally:
        handle.remove()
        del attention.forward


def test_use_cache_false_runs_uncompressed_without_error_and_says_so_once():
    """Nothing is cached, so nothing is compressed: right logits, and a warning (hunt round 12:
    generate(use_cache=False) under a press answered as the model alone, without a word)."""
    from kvpress_chunk.session import UncachedForwardWarning

    model = tiny("llama")
    ids = torch.randint(3, 120, (1, 80))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        with kc.make_press("chunkkv", compression_ratio=0.5, compile=False)(model):
            with pytest.warns(UncachedForwardWarning, match="use_cache=False") as caught:
                got = model(ids, use_cache=False).logits
                tokens = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert len([w for w in caught if w.category is UncachedForwardWarning]) == 1
    assert tokens.shape == (1, 83)


def test_decoding_a_compressed_cache_without_positions_is_refused():
    model = tiny("llama")
    ids = torch.randint(3, 120, (1, 100))
    cache = new_cache(model)
    with kc.make_press("chunkkv", compression_ratio=0.75, compile=False)(model), torch.no_grad():
        model(ids, **{cache_keyword(model): cache})
        with pytest.raises(ValueError, match="position_ids"):
            model(torch.tensor([[5]]), **{cache_keyword(model): cache})


def test_eager_attention_models_are_routed_too():
    model = tiny("llama")
    model.set_attn_implementation("eager")
    ids, mask, rows = left_padded([120, 50], seed=9)
    press = kc.make_press("chunkkv", compression_ratio=0.7, compile=False)
    batched = generate(model, ids, mask, press)
    for r, row in enumerate(rows):
        assert torch.equal(batched[r], generate(model, row[None], None, press)[0])
    assert model.config._attn_implementation == "eager"


def test_mask_mode_returns_every_layers_attention_weights_with_eager_attention():
    """``output_attentions=True`` on an eager model: mask mode's decode kernels returned no
    weights, and transformers leaves a layer without weights out of the tuple. On Gemma 3 the
    decode steps reported 2 layers instead of 4 (entry 1 was layer 2's weights, no error)."""
    model = tiny("gemma3")
    model.set_attn_implementation("eager")
    row = left_padded([100])[2][0][None]
    weights = {}
    for mode in ("evict", "mask"):
        press = kc.make_press("chunkkv", compression_ratio=0.7, compile=False, apply=mode)
        with press(model) as session, torch.no_grad():
            out = model.generate(row, max_new_tokens=2, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, output_attentions=True)
        assert sorted(session.views) == [1, 3]
        weights[mode] = out.attentions[-1]  # the last decode step
    assert len(weights["mask"]) == len(weights["evict"]) == 4
    for evict, mask in zip(weights["evict"], weights["mask"]):
        # The same probabilities, over kept slots (evict) or every slot with the hidden ones at 0 (mask).
        kept = mask.sort(dim=-1, descending=True).values[..., : evict.shape[-1]]
        torch.testing.assert_close(kept, evict.sort(dim=-1, descending=True).values, atol=1e-6, rtol=1e-5)


def test_unsupported_attention_implementations_are_refused_clearly():
    model = tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(kc.UnsupportedModelError, match="sdpa"):
        with kc.make_press("chunkkv", compression_ratio=0.5)(model):
            pass


def test_a_press_on_a_model_whose_layers_all_slide_warns_that_it_compresses_nothing():
    model = tiny("mistral-sliding")
    with pytest.warns(RuntimeWarning, match="no layer was compressed"):
        prefill(model, torch.randint(3, 120, (1, 100)), press=kc.make_press("chunkkv", compression_ratio=0.5, compile=False))


@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_accelerate_offloaded_model_compresses_and_answers_like_the_plain_model(mode):
    """accelerate's hooks (weights kept off the module, loaded per forward) sit on the same
    modules as ours: the press must still find every layer and give the same tokens."""
    import copy

    from accelerate import cpu_offload

    model = tiny("llama")
    offloaded = copy.deepcopy(model)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    press = kc.make_press("chunkkv", compression_ratio=0.75, compile=False, apply=mode)
    ids, mask, _ = left_padded([150, 110], seed=11)
    with press(offloaded) as session:
        got = offloaded.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(session.selections) == 4
    assert torch.equal(got[:, ids.shape[1]:], generate(model, ids, mask, press, new=5))


def test_a_prompt_longer_than_the_models_positions_warns_once():
    model = make_tiny_model("llama", max_position_embeddings=128)
    press = kc.make_press("chunkkv", compression_ratio=0.5, compile=False)
    with press(model), pytest.warns(RuntimeWarning, match="more than the 128 positions") as record, torch.no_grad():
        for _ in range(2):
            model(torch.randint(3, 120, (1, 150)), use_cache=True)
    assert sum("positions" in str(w.message) for w in record) == 1


def _rows_alone_and_modes_agree(model, new=5, per_head=False):
    """Padded rows = rows alone, mask mode = evict mode (logits: random tiny models tie tokens)."""
    ids, mask, rows = left_padded([80, 50], seed=3)
    # knorm reads no queries: these tests are about reading compressed caches, not about scoring
    presses = {mode: kc.make_press("knorm", per_head=per_head, compression_ratio=0.5, compile=False, apply=mode)
               for mode in ("evict", "mask")}

    def run(press, inputs, attention):
        with torch.no_grad(), press(model):
            out = model.generate(inputs, attention_mask=attention, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits, 1)

    batched = run(presses["evict"], ids, mask)
    for r, row in enumerate(rows):
        alone = run(presses["evict"], row[None], None)
        assert torch.allclose(batched[r], alone[0], atol=1e-4), f"row {r}: {(batched[r] - alone[0]).abs().max()}"
        masked = run(presses["mask"], row[None], None)
        assert torch.allclose(masked, alone, atol=1e-4), f"row {r} mask vs evict: {(masked - alone).abs().max()}"


@pytest.mark.parametrize("model_type,config", [("diffllama", {}), ("nemotron", {"partial_rotary_factor": 1.0})])
def test_a_model_whose_attention_ignores_the_attention_interface_is_refused_or_exact(model_type, config):
    """DiffLlama and Nemotron on transformers 5.2 fix their attention classes when built:
    ``set_attn_implementation`` only warned, our routed attention never ran, and padded rows and
    mask mode decoded through the model's own mask (other tokens, no error)."""
    model = make_auto_tiny_model(model_type, **config)
    try:
        _rows_alone_and_modes_agree(model)
    except UnsupportedModelError as exc:
        assert "AttentionInterface" in str(exc)


def test_per_head_eviction_of_a_model_that_remixes_value_heads_is_refused():
    """DiffLlama's value head h carries another KV head's values: per-head eviction keeps other
    tokens in each head's slots, so keys met other tokens' values (transformers 5.25: mask and
    evict mode differed by 0.37 in the logits, no error). On 5.2 the model is refused anyway."""
    model = make_auto_tiny_model("diffllama")
    with pytest.raises(UnsupportedModelError, match="mixes value heads|AttentionInterface"):
        _rows_alone_and_modes_agree(model, per_head=True)


def test_gemma3n_kv_shared_layers_read_their_store_layers_compressed_cache_or_are_refused():
    """Gemma 3n's KV-shared layers attend over the last "store" layer's keys. On transformers
    >= 5.3 they have no key projection of their own, so they had no route: with the store layer
    compressed, a padded row was off by 1.57 in the logits and mask mode attended to hidden
    tokens. They now read through the store layer's view (on 5.2 the press refuses the model)."""
    model = make_auto_tiny_model("gemma3n_text", vocab_size_per_layer_input=128, num_hidden_layers=4,
                        layer_types=["full_attention"] * 4, num_kv_shared_layers=2, initializer_range=0.2,
                        activation_sparsity_pattern=[0.0] * 4)
    try:
        _rows_alone_and_modes_agree(model)
    except (UnsupportedModelError, CacheNotFoundError) as exc:
        assert "cannot compress layer" in str(exc) or "not supported" in str(exc)


def test_mask_mode_decodes_gpt_oss_with_its_sink_logits():
    """GPT-OSS adds learned sink logits (``s_aux``) to every attention softmax. Mask mode's decode
    kernels (flex, gathered slots) took only queries, keys, values and the scale: they dropped the
    sinks, so mask mode decoded 0.65 away from evict mode in the logits (no error). Calls with any
    argument those kernels do not honour now go to the model's own attention with a dense mask."""
    model = make_auto_tiny_model("gpt_oss", layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                                 num_local_experts=2, num_experts_per_tok=1)
    _rows_alone_and_modes_agree(model)


def test_a_wrapper_passing_dropout_by_position_keeps_mask_mode_on_its_decode_kernel(monkeypatch):
    """NVIDIA kvpress wraps every attention function registered when it is imported (ours too,
    once a press ran) as ``(..., attention_mask, dropout, **kwargs)``, passing the dropout by
    position. Read as an unknown argument, it sent every mask-mode decode step to the dense path
    (and KVzip's pass off its fused attention) for the rest of the process: same answers, slower,
    no word. Simulated here with kvpress' calling convention (kvpress itself: pinned leg only)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kvpress_chunk.modes import gathered

    model = tiny("llama")
    ids, mask, _ = left_padded([60, 40])
    press = kc.make_press("chunkkv", compression_ratio=0.5, apply="mask", compile=False)
    monkeypatch.setenv("KVPRESS_CHUNK_MASK_DECODE", "gather")
    calls = []
    attend = gathered.PrefixSlots.attend
    monkeypatch.setattr(gathered.PrefixSlots, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    expected = generate(model, ids, mask, press)  # registers the routed functions
    direct = len(calls)
    assert direct > 0

    def positional_dropout(func):
        def wrapper(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
            return func(module, query, key, value, attention_mask, dropout, **kwargs)
        return wrapper

    routed = [name for name in list(ALL_ATTENTION_FUNCTIONS.keys()) if name.startswith("kvpress_chunk_")]
    for name in routed:
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, name, positional_dropout(ALL_ATTENTION_FUNCTIONS[name]))
    assert torch.equal(generate(model, ids, mask, press), expected)
    assert len(calls) - direct == direct  # every decode step again on the mask-mode kernel


def test_a_compressed_layer_that_skips_the_routed_attention_is_an_error_not_a_silent_pass_through(monkeypatch):
    """The safety net behind the build-time check: a model that accepts the implementation but
    whose attention still calls its own kernel (simulated on a tiny Llama) is refused at the
    first forward that reads a compressed cache."""
    from transformers.models.llama import modeling_llama

    class OwnKernel:
        def get_interface(self, name, default):
            return modeling_llama.eager_attention_forward

    model = tiny("llama")
    ids, mask, _ = left_padded([60, 40])
    press = kc.make_press("knorm", compression_ratio=0.5, compile=False)
    monkeypatch.setattr(modeling_llama, "ALL_ATTENTION_FUNCTIONS", OwnKernel())
    with pytest.raises(UnsupportedModelError, match="did not attend through"):
        generate(model, ids, mask, press)


def test_a_model_that_runs_a_layer_twice_in_one_forward_is_refused():
    """HRM (transformers >= 5.2x) loops its layers H_cycles x (L_cycles + 1) times per forward:
    the press scored the first call's inputs while later calls read and rewrote the cache
    (window attention off by ~1.0 against the model's, no error)."""
    model = make_auto_tiny_model("hrm_text", num_hidden_layers=2)
    ids = torch.randint(3, 120, (1, 60), generator=torch.Generator().manual_seed(0))
    # Its H and L modules number their layers alike: refused when the layers are found, before
    # any forward (the run-time check below stays the safety net for other looped layouts).
    with pytest.raises(UnsupportedModelError, match="ran more than once in one forward|both claim attention layer"):
        generate(model, ids, None, kc.make_press("snapkv", compression_ratio=0.5, compile=False))


def test_a_model_with_one_attention_block_shared_by_several_layers_is_refused():
    """Zamba 2's shared attention block has layer_idx -1: the press took it for a layer "-1" and
    failed with an IndexError (transformers 5.2) or a cache-layer TypeError (5.25) deep inside."""
    model = make_auto_tiny_model("zamba2", num_hidden_layers=4, layers_block_type=["mamba", "hybrid"] * 2,
                                 mamba_d_state=4, mamba_headdim=64, n_mamba_heads=2, num_mem_blocks=1, adapter_rank=8)
    with pytest.raises(UnsupportedModelError, match="shared by several layers"):
        generate(model, torch.randint(3, 120, (1, 40)), None, kc.make_press("knorm", compression_ratio=0.5, compile=False))


def test_a_multimodal_models_vision_attention_is_not_taken_for_its_text_layers():
    """Gemma 4's vision tower is built before its language model and has attention modules of the
    same shape and layer numbers: they took text layers 0 and 1, which were never hooked nor
    routed (a shape error here; with as many vision as text layers, nothing compressed)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma4ForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, max_position_embeddings=512, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
        torch.manual_seed(0)
        model = transformers.Gemma4ForConditionalGeneration(config).eval()
    found = kc.find_attention_layers(model)
    assert [type(module).__name__ for _, module in found] == ["Gemma4TextAttention"] * 4
    _rows_alone_and_modes_agree(model)


def test_a_custom_4d_mask_on_a_prefill_is_refused():
    # Its padding was read as real tokens (scored, kept, and attended to when decoding with a
    # 2-D mask afterwards): a keep-all press differed from no press by 0.42 in a padded row's logits.
    model = make_tiny_model("llama")
    ids = torch.randint(3, 100, (1, 40))
    mask = torch.zeros(1, 1, 40, 40).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    cache = new_cache(model)
    with kc.make_press("chunkkv", compression_ratio=0.0)(model), torch.no_grad():
        with pytest.raises(ValueError, match="2-D attention_mask"):
            model(ids, attention_mask=mask, past_key_values=cache)


def test_chunkkv_kvpress_scores_a_padded_row_as_if_alone():
    # Its window's "max + 1" constant was a max over the whole batch: a row's window chunks tied
    # with other chunks differently in a batch than alone (40 vs 30 tokens kept, logits off by 0.11).
    model = make_tiny_model("llama")
    ids, mask, rows = tiny_models.left_padded([90, 70, 120], seed=1)  # its data ties chunks
    press = kc.make_press("chunkkv-kvpress", compression_ratio=0.6, compile=False)
    with torch.no_grad():
        batched = prefill(model, ids, attention_mask=mask, press=press)
        for r, row in enumerate(rows):
            alone = prefill(model, row[None], press=press)
            for layer, view in alone.layer_views.items():
                kept_alone = view.visible[0].sum(-1)
                assert torch.equal(batched.layer_views[layer].visible[r].sum(-1), kept_alone), (r, layer)
            torch.testing.assert_close(batched.last_logits[r], alone.last_logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("entry", ["generate", "prefill"])
def test_a_row_that_is_all_padding_is_refused_by_name_before_the_forward_runs(mode, entry):
    # generate failed one step after the prefill with "its new tokens start at position(s) [1, 40],
    # the text it stands for ends before [0, 40]", after compressing the batch.
    model = make_tiny_model("llama")
    ids, mask, _ = left_padded([40, 30, 20])
    ids[1], mask[1] = 0, 0
    press = kc.make_press("chunkkv", compression_ratio=0.5, apply=mode)
    ran = []
    handle = kc.find_attention_layers(model)[0][1].register_forward_hook(lambda *args: ran.append(1))
    try:
        with pytest.raises(ValueError, match=r"row\(s\) \[1\] of this batch are all padding"):
            if entry == "generate":
                with press(model), torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
            else:
                prefill(model, ids, attention_mask=mask, press=press)
    finally:
        handle.remove()
    assert not ran  # refused before any layer ran


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_continue_feeds_a_padded_batch_of_questions_as_each_row_alone(family, mode, padding_side):
    # greedy_continue took no mask: a padded batch of questions fed its padding as tokens (a
    # 2-token question left-padded to 5 answered [9, 90, 91, 54, 83, 9, 90, 91] instead of the
    # row alone's [9, 90, 91, 54, 25, 25, 25, 25] on tiny Llama, no error).
    model = tiny(family)
    ids, mask, rows = left_padded([60, 45, 70])
    press = kc.make_press("chunkkv", compression_ratio=0.5, apply=mode, compile=False)
    questions = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12]), torch.tensor([13, 14, 15])]
    width = max(len(q) for q in questions)
    q_ids, q_mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for r, q in enumerate(questions):
        span = slice(width - len(q), width) if padding_side == "left" else slice(0, len(q))
        q_ids[r, span], q_mask[r, span] = q, 1
    context = prefill(model, ids, attention_mask=mask, press=press)
    batched = greedy_continue(model, context.copy(), q_ids, 8, attention_mask=q_mask)
    eos = int(batched[1, 3])  # a token row 1 generates: it stops there and pads with it
    stopped = greedy_continue(model, context.copy(), q_ids, 8, eos_token_ids=[eos], attention_mask=q_mask)
    for r, row in enumerate(rows):
        alone = prefill(model, row[None], press=press)
        assert batched[r].tolist() == greedy_continue(model, alone.copy(), questions[r][None], 8)[0].tolist(), r
        own = greedy_continue(model, alone.copy(), questions[r][None], 8, eos_token_ids=[eos])[0].tolist()
        assert stopped[r, :len(own)].tolist() == own and set(stopped[r, len(own):].tolist()) <= {eos}, r
    # The context continues after the question like the rows alone do.
    after = context.copy()
    greedy_continue(model, after, q_ids, 3, attention_mask=q_mask)
    assert after.next_positions.tolist() == [n + width + 2 for n in (60, 45, 70)]


@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_greedy_continue_with_no_new_tokens_still_feeds_the_question(mode):
    # It fed nothing (found by hunt round 10): a question "fed" with max_new_tokens=0 was not in
    # the context, and the answer that followed continued the bare context instead.
    model = make_tiny_model("llama")
    ids = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(3))
    question, more = ids[:, :5], ids[:, 5:8]
    press = kc.make_press("chunkkv", compression_ratio=0.5, apply=mode)
    with torch.no_grad():
        context = prefill(model, ids[:, 8:], press=press)
        at_once = greedy_continue(model, context.copy(), torch.cat([question, more], dim=1), max_new_tokens=6)
        assert greedy_continue(model, context, question, max_new_tokens=0).shape == (1, 0)
        assert int(context.next_positions[0]) == 52 + 5
        in_two = greedy_continue(model, context, more, max_new_tokens=6)
    assert torch.equal(in_two, at_once)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        greedy_continue(model, context, more, max_new_tokens=-1)

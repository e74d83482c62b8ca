"""kvpress-chunk: composable, compiled KV-cache compression (ChunkKV and friends) for HF models.

Public API::

    from kvpress_chunk import make_press, list_presets, generate_answers, load_default_model
    press = make_press("chunkkv", compression_ratio=0.75)
    with press(model):
        model(input_ids, past_key_values=cache)
"""

from .hf.versions import check_transformers

check_transformers()  # refuse, clearly, a transformers older than the suite runs on

from . import policies  # noqa: E402,F401  (registers the built-in parts and presets)
from .budget import Budget, BudgetError
from .generation import CompressedContext, generate_answers, greedy_continue, prefill
from .hf.hooks import UnsupportedModelError, find_attention_layers
from .policies.presets import list_presets, preset
from .press import Press
from .session import PressAlreadyActiveError, PressSession
from .spec import make_press
from .registry import SpecError, register, registered
from .selection import Selection


def load_default_model(*args, **kwargs):
    """The embedded SmolLM2-135M-Instruct as ``(model, tokenizer)``, offline (see :mod:`.hf.models`)."""
    from .hf.models import load_default_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "Budget", "BudgetError", "CompressedContext", "Press", "PressAlreadyActiveError", "PressSession",
    "Selection", "SpecError", "UnsupportedModelError", "find_attention_layers", "generate_answers",
    "greedy_continue", "list_presets", "load_default_model", "make_press", "prefill", "preset",
    "register", "registered",
]
__version__ = "0.1.0"

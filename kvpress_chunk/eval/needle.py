"""A needle in a haystack, generated locally (no datasets): the smallest honest quality check.

The haystack is RULER's noise filler; the needle is a 7-digit number, the format that punishes
token-level eviction (keeping "466" of "4664860" is a miss).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the special magic number mentioned in the text? Answer with the number only."


@dataclass(frozen=True)
class NeedleCase:
    context: str
    question: str
    answer: str
    depth: float
    context_tokens: int


def make_needle_case(tokenizer, context_tokens: int = 2000, depth: float = 0.5, seed: int = 0) -> NeedleCase:
    """A haystack of about ``context_tokens`` tokens with one needle sentence at ``depth`` (0..1)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    answer = str(random.Random(seed).randint(1_000_000, 9_999_999))
    needle = f"The special magic number is {answer}. "
    per_repeat = len(tokenizer(NOISE, add_special_tokens=False).input_ids)
    repeats = max(1, (context_tokens - len(tokenizer(needle, add_special_tokens=False).input_ids)) // per_repeat)
    before = round(repeats * depth)
    context = NOISE * before + needle + NOISE * (repeats - before)
    tokens = len(tokenizer(context, add_special_tokens=False).input_ids)
    return NeedleCase(context, QUESTION, answer, depth, tokens)


def is_hit(answer: str, expected: str) -> bool:
    """Exact substring match of the expected answer."""
    return expected in answer

"""Needle-in-a-haystack and RULER-style tasks, generated locally and seeded (no downloads).

Every task builds a haystack of about ``context_tokens`` tokens (RULER's noise filler, or the
license-clean prose shipped in ``data/prose.txt``), inserts needle sentences at chosen depths and
asks a question whose answers are exact strings. Needle formats that punish token-level eviction:
7-digit numbers, 8-character hex codes and full names (keeping "466" of "4664860" is a miss).

Tasks (RULER, arXiv 2404.06654):

* ``niah``: one needle (no key), one question.
* ``multikey``: the needle plus distractor needles with other keys; asked about one key.
* ``multivalue``: one key with several values scattered in the text; all values are asked for.
* ``multiquery``: several keys; the values of all of them are asked for.
* ``vt`` (variable tracking): a chain ``X1 = value``, ``X2 = X1``, ...; all names holding the value.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Callable

from ..registry import function_registrar

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
HAYSTACKS = ("noise", "prose")
NEEDLE_FORMATS = ("number", "hex", "name")

_FIRST = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jonas", "Kavya", "Lucia")
_LAST = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Castellano", "Novak", "Brennan", "Haddad", "Quintero", "Van Dijk")
_KEY_WORDS = ("amber", "falcon", "granite", "willow", "cobalt", "harbor", "meadow", "lantern", "quartz", "saffron",
              "thistle", "juniper", "copper", "orchid", "glacier", "ember")
_FORMAT_NOUN = {"number": "number", "hex": "code", "name": "name"}


@dataclass(frozen=True)
class Case:
    """One evaluation case. ``answers``: every string the model must produce (all are required)."""

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    depth: float
    context_tokens: int
    target_tokens: int
    haystack: str
    needle_format: str
    seed: int
    needles: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("context")
        return data


def score_answer(answer: str, expected: tuple[str, ...]) -> float:
    """Fraction of expected strings found verbatim in the answer as a whole word: case-sensitive,
    and with no letter or digit touching it on either side (start or end of the answer, spaces,
    punctuation and ``_`` are boundaries; any Unicode letter or digit, as ``str.isalnum``, is not).

    Why: a bare substring test scored "128466537810" right for the number 1284665 (knorm at 50% in
    ``docs/leaderboard.jsonl``), as it would a longer hex code around the expected one or "Maria
    Lopezberg" for "Maria Lopez". ``\\b`` is not used: it takes ``_`` for a letter. (So "0x" glued
    before a hex code makes it a miss too.)"""
    return sum(bool(re.search(rf"(?<![^\W_]){re.escape(item)}(?![^\W_])", answer)) for item in expected) / len(expected)


@lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    text = resources.files("kvpress_chunk.eval").joinpath("data/prose.txt").read_text(encoding="utf-8")
    sentences = []
    for paragraph in text.split("\n\n"):
        for sentence in paragraph.replace("\n", " ").split(". "):
            sentence = sentence.strip()
            if sentence:
                sentences.append(sentence if sentence.endswith((".", "?", "!")) else sentence + ".")
    return tuple(sentences)


def _haystack_sentences(kind: str, rng: random.Random) -> Callable[[], str]:
    if kind == "noise":
        cycle = iter(())

        def next_noise() -> str:
            nonlocal cycle
            try:
                return next(cycle)
            except StopIteration:
                cycle = iter(NOISE_SENTENCES)
                return next(cycle)

        return next_noise
    if kind == "prose":
        pool = list(prose_sentences())
        order: list[str] = []

        def next_prose() -> str:
            if not order:
                order.extend(rng.sample(pool, len(pool)))
            return order.pop()

        return next_prose
    raise ValueError(f"unknown haystack {kind!r}; valid: {', '.join(HAYSTACKS)}")


def make_value(needle_format: str, rng: random.Random) -> str:
    if needle_format == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if needle_format == "hex":
        return "".join(rng.choice("0123456789abcdef") for _ in range(8))
    if needle_format == "name":
        return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    raise ValueError(f"unknown needle format {needle_format!r}; valid: {', '.join(NEEDLE_FORMATS)}")


def _make_key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"
        if key not in used and key.split("-")[0] != key.split("-")[1]:
            used.add(key)
            return key


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def build_context(tokenizer, target_tokens: int, needles: list[tuple[float, str]], haystack: str, rng: random.Random) -> str:
    """Fill a haystack to ``target_tokens`` and insert each ``(depth, sentence)`` at that depth.

    Depth is measured in haystack tokens and needles sit between sentences, so a needle at
    depth 0.5 has (about) half of the filler before it.
    """
    next_sentence = _haystack_sentences(haystack, rng)
    needle_tokens = sum(_count(tokenizer, " " + text) for _, text in needles)
    budget = max(0, target_tokens - needle_tokens)
    filler: list[str] = []
    lengths: list[int] = []
    total = 0
    while total < budget:
        sentence = next_sentence()
        n = _count(tokenizer, " " + sentence)
        if total + n > budget and filler:
            # Fill the remainder with the start of the sentence, so long prose sentences do not
            # leave the context short of its target.
            words = sentence.rstrip(".").split()
            while words and total + (n := _count(tokenizer, " " + " ".join(words) + ".")) > budget:
                words.pop()
            if words:
                filler.append(" ".join(words) + ".")
                lengths.append(n)
                total += n
            break
        filler.append(sentence)
        lengths.append(n)
        total += n
    # Sentence index for each needle: the first boundary where the filler before reaches depth.
    cumulative = [0]
    for n in lengths:
        cumulative.append(cumulative[-1] + n)
    inserts: dict[int, list[str]] = {}
    for depth, text in needles:
        wanted = depth * total
        position = min(range(len(cumulative)), key=lambda i: abs(cumulative[i] - wanted))
        inserts.setdefault(position, []).append(text)
    parts: list[str] = []
    for i in range(len(filler) + 1):
        parts.extend(inserts.get(i, []))
        if i < len(filler):
            parts.append(filler[i])
    return " ".join(parts)


@dataclass
class Draw:
    """What a task function gets: the seeded generator and the case's settings, with helpers that
    keep keys unique. ``key``/``value`` are the asked needle's; ``depth`` is where it goes and
    ``other_depths`` where the other needles (distractors, extra values, chain links) go."""

    rng: random.Random
    noun: str
    needle_format: str
    depth: float
    other_depths: list[float]
    used: set[str] = field(default_factory=set)
    key: str = ""
    value: str = ""

    def new_key(self) -> str:
        return _make_key(self.rng, self.used)

    def new_value(self) -> str:
        return make_value(self.needle_format, self.rng)

    def needle(self, key: str, value: str) -> str:
        return f"The special magic {self.noun} for {key} is: {value}."


@dataclass(frozen=True)
class TaskCase:
    """A task function's result: ``needles`` as ``(depth, sentence)``, the question, the answers."""

    needles: list[tuple[float, str]]
    question: str
    answers: tuple[str, ...]


TaskFn = Callable[[Draw], TaskCase]
_TASKS: dict[str, TaskFn] = {}


def task(name: str) -> Callable[[TaskFn], TaskFn]:
    """Register an evaluation task: one function ``Draw -> TaskCase`` plus this decorator makes
    it available to :func:`make_case`, ``kvpress-chunk eval NAME`` and the sweeps. Registering
    another function under a taken name raises ``SpecError`` (a ``ValueError``)."""
    return function_registrar(_TASKS, "task")(name)


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


@task("niah")
def niah(draw: Draw) -> TaskCase:
    """One needle, no key (RULER's niah_single style): nothing to confuse it with."""
    return TaskCase(
        [(draw.depth, f"The special magic {draw.noun} is: {draw.value}.")],
        f"What is the special magic {draw.noun} mentioned in the provided text?",
        (draw.value,),
    )


@task("multikey")
def multikey(draw: Draw) -> TaskCase:
    """The needle plus distractor needles with other keys; asked about one key."""
    needles = [(draw.depth, draw.needle(draw.key, draw.value))]
    needles += [(d, draw.needle(draw.new_key(), draw.new_value())) for d in draw.other_depths]
    return TaskCase(needles, f"What is the special magic {draw.noun} for {draw.key} mentioned in the provided text?", (draw.value,))


@task("multivalue")
def multivalue(draw: Draw) -> TaskCase:
    """One key with several values scattered in the text; all values are asked for."""
    values = [draw.value] + [draw.new_value() for _ in draw.other_depths]
    needles = [(d, draw.needle(draw.key, v)) for d, v in zip([draw.depth] + draw.other_depths, values)]
    question = f"What are all the special magic {draw.noun}s for {draw.key} mentioned in the provided text?"
    return TaskCase(needles, question, tuple(values))


@task("multiquery")
def multiquery(draw: Draw) -> TaskCase:
    """Several keys; the values of all of them are asked for."""
    keys = [draw.key] + [draw.new_key() for _ in draw.other_depths]
    values = [draw.value] + [draw.new_value() for _ in draw.other_depths]
    needles = [(d, draw.needle(k, v)) for d, k, v in zip([draw.depth] + draw.other_depths, keys, values)]
    question = (f"What are the special magic {draw.noun}s for {', '.join(keys[:-1])} and {keys[-1]} "
                "mentioned in the provided text?")
    return TaskCase(needles, question, tuple(values))


@task("vt")
def variable_tracking(draw: Draw) -> TaskCase:
    """Variable tracking: a chain ``X1 = value``, ``X2 = X1``, ...; all names holding the value."""
    names: list[str] = []
    while len(names) < len(draw.other_depths) + 1:
        name = "".join(draw.rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    chain_depths = sorted([draw.depth] + draw.other_depths)
    needles = [(chain_depths[0], f"VAR {names[0]} = {draw.value}.")]
    needles += [(d, f"VAR {names[i + 1]} = VAR {names[i]}.") for i, d in enumerate(chain_depths[1:])]
    return TaskCase(needles, f"Find all variables that are assigned the value {draw.value} in the text above.", tuple(names))


def make_case(
    tokenizer,
    task: str = "niah",
    context_tokens: int = 2000,
    depth: float = 0.5,
    haystack: str = "noise",
    needle_format: str = "number",
    seed: int = 0,
    n_extra: int = 3,
) -> Case:
    """Generate one case. ``depth`` places the asked needle; other needles (distractors, extra
    values, chain links) are spread over the rest of the context, seeded."""
    made, rng = draw_case(task, context_tokens, depth, haystack, needle_format, seed, n_extra)
    context = build_context(tokenizer, context_tokens, made.needles, haystack, rng)
    return Case(
        task=task, context=context, question=made.question, answers=made.answers, depth=depth,
        context_tokens=_count(tokenizer, context), target_tokens=context_tokens, haystack=haystack,
        needle_format=needle_format, seed=seed, needles=tuple(text for _, text in made.needles),
    )


def draw_case(task: str, context_tokens: int, depth: float, haystack: str, needle_format: str, seed: int,
              n_extra: int = 3) -> tuple[TaskCase, random.Random]:
    """What :func:`make_case` draws before it builds the haystack, and without a tokenizer: the
    task's needles, question and expected answers, and the seeded generator left for the haystack
    (how a store that kept only the model's answers is re-scored, :func:`.leaderboard.rescore`)."""
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(_TASKS)}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if context_tokens < 50:
        raise ValueError(f"context_tokens must be >= 50, got {context_tokens}")
    if needle_format not in NEEDLE_FORMATS:
        raise ValueError(f"unknown needle format {needle_format!r}; valid: {', '.join(NEEDLE_FORMATS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; valid: {', '.join(HAYSTACKS)}")
    rng = random.Random(f"{task}-{context_tokens}-{depth}-{haystack}-{needle_format}-{seed}")
    draw = Draw(rng, _FORMAT_NOUN[needle_format], needle_format, depth, [round(rng.uniform(0.05, 0.95), 3) for _ in range(n_extra)])
    draw.key = draw.new_key()
    draw.value = draw.new_value()
    return _TASKS[task](draw), rng

"""Groupers: which tokens live and die together? ``valid[B, T] -> group_ids[B, T]``.

Group ids run from 0 to ``num_groups(T) - 1``; padding tokens get the extra bucket
``num_groups(T)``, which selectors ignore. Groups are laid out from each row's first *real*
token, so a left-padded batch row is cut into exactly the chunks it would get alone.

``reduce`` says how token scores become a group score: ``"sum"`` (ChunkKV paper, Algorithm 1),
``"mean"`` (kvpress' ChunkKVPress) or ``"max"`` (a group is as important as its best token).
Sum and mean rank full chunks identically; they differ on partial chunks (the tail chunk, chunks
overlapping protected tokens), where ``"sum"`` penalises size. ``"max"`` suits peaked scores
(KVzip's largest attention from any query), where a sum ranks a chunk of five lukewarm tokens
above a chunk holding the one token a copy step needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral

import torch

from ..registry import register
from .layer_inputs import LayerInputs
from .validation import check_choice, check_int, refuse_setting

REDUCTIONS = ("sum", "mean", "max")


class Grouper:
    """Base class: frozen dataclasses registered with ``@register("grouper", name)``.

    Like a scorer, a grouper has an eager half (:meth:`prepare`, which may read the prefill's
    tokens and the model) and a pure half (:meth:`group_ids`, traced by ``torch.compile``)."""

    reduce: str = "mean"

    def prepare(self, inputs: "LayerInputs") -> dict[str, torch.Tensor]:
        """Eager preparation: extra tensors for :meth:`group_ids` (e.g. sentence ends)."""
        return {}

    #: Upper bound on the tokens of one group; used to size the selection statically.
    @property
    def max_group_size(self) -> int:
        raise NotImplementedError

    def num_groups(self, length: int) -> int:
        """Upper bound on the number of groups in a row of ``length`` tokens (a Python int)."""
        raise NotImplementedError

    def group_ids(self, valid: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """Pure tensor function: ``valid[B, T]`` (+ :meth:`prepare`'s tensors) -> ``int64[B, T]``
        (padding -> ``num_groups(T)``)."""
        raise NotImplementedError


def positions_from_row_start(valid: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from its row's first real token (left padding < 0)."""
    length = valid.shape[-1]
    padding = length - valid.sum(dim=-1, keepdim=True)
    return torch.arange(length, device=valid.device) - padding


def _check_reduce(grouper: "Grouper") -> None:
    check_choice(grouper, "reduce", REDUCTIONS)


@register("grouper", "token")
@dataclass(frozen=True)
class TokenGrouper(Grouper):
    """Every token is its own group: plain token-level selection (SnapKV, H2O, Knorm...)."""

    reduce: str = "mean"

    def __post_init__(self) -> None:
        _check_reduce(self)

    @property
    def max_group_size(self) -> int:
        return 1

    def num_groups(self, length: int) -> int:
        return length

    def group_ids(self, valid: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        length = valid.shape[-1]
        ids = torch.arange(length, device=valid.device).expand_as(valid)
        return torch.where(valid, ids, length)


@register("grouper", "chunk")
@dataclass(frozen=True)
class ChunkGrouper(Grouper):
    """Fixed chunks of ``size`` consecutive tokens (ChunkKV, arXiv 2502.00299); the last chunk of
    a row may be shorter. The paper uses ``size=10`` (stable from 5 to 20)."""

    size: int = 10
    reduce: str = "sum"

    def __post_init__(self) -> None:
        check_int(self, "size", minimum=1, meaning="the chunk size in tokens")
        _check_reduce(self)

    @property
    def max_group_size(self) -> int:
        return self.size

    def num_groups(self, length: int) -> int:
        return -(-length // self.size)

    def group_ids(self, valid: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        local = positions_from_row_start(valid)
        pad_bucket = -(-valid.shape[-1] // self.size)
        return torch.where(valid, torch.div(local, self.size, rounding_mode="floor"), pad_bucket)


SENTENCE_END_CHARACTERS = ".!?;:\n"


@register("grouper", "sentence")
@dataclass(frozen=True)
class SentenceGrouper(Grouper):
    """Sentence-boundary chunks: the "semantic chunks" of the ChunkKV title (arXiv 2502.00299)
    that fixed-size chunks only approximate (cf. SABlock, arXiv 2510.22556).

    A group ends after a token that ends a sentence or a line (``.!?;:`` or a newline, found in
    the model's vocabulary) and is cut after ``max_size`` tokens at the latest, so one long
    paragraph cannot become a single all-or-nothing group. ``boundary_ids`` fixes the ending
    tokens explicitly; by default they are read once from the tokenizer saved next to the model
    (``model.config._name_or_path``, offline). Groups are laid out from each row's first real
    token, so a padded batch row is cut as it would be alone. ``reduce="mean"`` by default:
    sentences differ in length, and a sum would favour long ones.
    """

    max_size: int = 32
    reduce: str = "mean"
    boundary_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_int(self, "max_size", minimum=1, meaning="the longest sentence chunk in tokens")
        _check_reduce(self)
        if self.boundary_ids is not None:
            # A string or a float id was read silently (``"13"`` as the ids 1 and 3, ``2.7`` as 2).
            ids = self.boundary_ids
            if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
                refuse_setting(self, "boundary_ids", "None or a list of token ids (ints >= 0)")
            ids = tuple(ids)
            if not all(isinstance(i, Integral) and not isinstance(i, bool) and i >= 0 for i in ids):
                refuse_setting(self, "boundary_ids", "None or a list of token ids (ints >= 0)")
            object.__setattr__(self, "boundary_ids", tuple(int(i) for i in ids))

    @property
    def max_group_size(self) -> int:
        return self.max_size

    def num_groups(self, length: int) -> int:
        return length  # upper bound: every token its own sentence

    def prepare(self, inputs: LayerInputs) -> dict[str, torch.Tensor]:
        if inputs.input_ids is None:
            raise ValueError("the sentence grouper needs the prefill's input_ids (the model was called with inputs_embeds)")
        ids = self.boundary_ids
        if ids is None:
            ids = boundary_token_ids(_model_folder(inputs))
        table = torch.zeros(int(inputs.input_ids.max()) + 1, dtype=torch.bool, device=inputs.input_ids.device)
        known = torch.tensor([i for i in ids if i < table.shape[0]], dtype=torch.long, device=table.device)
        table[known] = True
        return {"ends": table[inputs.input_ids]}

    def group_ids(self, valid: torch.Tensor, ends: torch.Tensor | None = None, **extra: torch.Tensor) -> torch.Tensor:
        if ends is None:
            raise ValueError("SentenceGrouper.group_ids needs `ends` from prepare()")
        length = valid.shape[-1]
        positions = torch.arange(length, device=valid.device).expand_as(valid)
        ends = ends & valid
        after_end = torch.nn.functional.pad(ends[:, :-1], (1, 0))  # the previous token ended a sentence
        first_real = valid & ~torch.nn.functional.pad(valid[:, :-1], (1, 0))
        sentence_start = valid & (after_end | first_real)
        start_pos = torch.where(sentence_start, positions, -1).cummax(dim=-1).values
        starts = sentence_start | (valid & ((positions - start_pos) % self.max_size == 0))
        ids = torch.cumsum(starts.to(torch.int64), dim=-1) - 1
        return torch.where(valid, ids, length)


def _model_folder(inputs: LayerInputs) -> str:
    config = getattr(inputs.module, "config", None)
    folder = getattr(config, "_name_or_path", "") or ""
    if not folder:
        raise ValueError(
            "the sentence grouper cannot find the model's tokenizer to learn which tokens end a sentence: "
            "pass boundary_ids=(...) (e.g. kvpress_chunk.policies.groupers.boundary_token_ids(tokenizer))"
        )
    return folder


_BOUNDARIES: dict[str, tuple[int, ...]] = {}


def boundary_token_ids(tokenizer_or_folder) -> tuple[int, ...]:
    """Token ids whose text ends with sentence punctuation or holds a newline (cached per folder)."""
    if isinstance(tokenizer_or_folder, str):
        if tokenizer_or_folder not in _BOUNDARIES:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_or_folder, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - any loading failure gets the same advice
                raise ValueError(
                    f"the sentence grouper could not load the tokenizer of {tokenizer_or_folder!r} offline "
                    f"({type(exc).__name__}); pass boundary_ids=(...) explicitly"
                ) from None
            _BOUNDARIES[tokenizer_or_folder] = boundary_token_ids(tokenizer)
        return _BOUNDARIES[tokenizer_or_folder]
    tokenizer = tokenizer_or_folder
    found = []
    for token, index in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        stripped = text.rstrip(" ")
        if "\n" in text or (stripped and stripped[-1] in SENTENCE_END_CHARACTERS and len(stripped.strip()) <= 3):
            found.append(index)
    return tuple(sorted(found))

"""Groupers: which tokens live and die together? ``valid[B, T] -> group_ids[B, T]``.

Group ids run from 0 to ``num_groups(T) - 1``; padding tokens get the extra bucket
``num_groups(T)``, which selectors ignore. Groups are laid out from each row's first *real*
token, so a left-padded batch row is cut into exactly the chunks it would get alone.

``reduce`` says how token scores become a group score: ``"sum"`` (ChunkKV paper, Algorithm 1)
or ``"mean"`` (kvpress' ChunkKVPress). They rank full chunks identically; they differ on partial
chunks (the tail chunk, chunks overlapping protected tokens), where ``"sum"`` penalises size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register

REDUCTIONS = ("sum", "mean")


class Grouper:
    """Base class: frozen dataclasses registered with ``@register("grouper", name)``."""

    reduce: str = "mean"

    #: Upper bound on the tokens of one group; used to size the selection statically.
    @property
    def max_group_size(self) -> int:
        raise NotImplementedError

    def num_groups(self, length: int) -> int:
        """Upper bound on the number of groups in a row of ``length`` tokens (a Python int)."""
        raise NotImplementedError

    def group_ids(self, valid: torch.Tensor) -> torch.Tensor:
        """Pure tensor function: ``valid[B, T]`` -> ``int64[B, T]`` (padding -> ``num_groups(T)``)."""
        raise NotImplementedError


def positions_from_row_start(valid: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from its row's first real token (left padding < 0)."""
    length = valid.shape[-1]
    padding = length - valid.sum(dim=-1, keepdim=True)
    return torch.arange(length, device=valid.device) - padding


def _check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")


@register("grouper", "token")
@dataclass(frozen=True)
class TokenGrouper(Grouper):
    """Every token is its own group: plain token-level selection (SnapKV, H2O, Knorm...)."""

    reduce: str = "mean"

    def __post_init__(self) -> None:
        _check_reduce(self.reduce)

    @property
    def max_group_size(self) -> int:
        return 1

    def num_groups(self, length: int) -> int:
        return length

    def group_ids(self, valid: torch.Tensor) -> torch.Tensor:
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
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"chunk size must be an integer >= 1, got {self.size!r}")
        _check_reduce(self.reduce)

    @property
    def max_group_size(self) -> int:
        return self.size

    def num_groups(self, length: int) -> int:
        return -(-length // self.size)

    def group_ids(self, valid: torch.Tensor) -> torch.Tensor:
        local = positions_from_row_start(valid)
        pad_bucket = -(-valid.shape[-1] // self.size)
        return torch.where(valid, torch.div(local, self.size, rounding_mode="floor"), pad_bucket)

"""How many tokens a layer keeps.

Two ways to say it, exactly one per press:

* ``compression_ratio`` r in [0, 1): the fraction *removed*, kvpress' convention. A row of ``T``
  real tokens keeps ``max(1, int(T * (1 - r)))`` tokens -- the very count kvpress keeps, so the
  same ratio means the same memory in both libraries. (The ChunkKV paper speaks of the fraction
  *kept*: its "10%" is ``compression_ratio=0.9``.)
* ``budget`` b >= 1: keep ``min(T, b)`` tokens (the paper's needle-in-a-haystack "KV size").

Protected tokens (attention sinks, the observation window) are always kept and count inside the
budget; if they alone exceed it, they are kept anyway (the row keeps ``min(T, protected)``).
A row whose length is at most the scorer's window is kept whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class BudgetError(ValueError):
    """Invalid budget settings."""


@dataclass(frozen=True)
class Budget:
    compression_ratio: float | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        if (self.compression_ratio is None) == (self.budget is None):
            raise BudgetError(
                "give exactly one of compression_ratio (fraction removed, in [0, 1)) or budget (tokens kept); "
                f"got compression_ratio={self.compression_ratio!r}, budget={self.budget!r}"
            )
        if self.compression_ratio is not None:
            ratio = self.compression_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio):
                raise BudgetError(f"compression_ratio must be a number in [0, 1), got {ratio!r}")
            if not 0 <= ratio < 1:
                raise BudgetError(f"compression_ratio must be in [0, 1) (fraction of tokens removed), got {ratio!r}")
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
                raise BudgetError(f"budget must be an integer >= 1 (tokens kept per row), got {self.budget!r}")

    @property
    def is_noop(self) -> bool:
        """True when nothing can ever be removed (ratio 0)."""
        return self.compression_ratio == 0

    def kept(self, count: int) -> int:
        """Items kept out of ``count`` (Python ints; same rule as :meth:`kept_tensor`)."""
        if self.compression_ratio is not None:
            return min(count, max(1, int(count * (1 - self.compression_ratio))))
        return min(count, self.budget)

    @property
    def kind(self) -> str:
        """``"ratio"`` or ``"budget"``: what compiled code specialises on (never the value)."""
        return "ratio" if self.compression_ratio is not None else "budget"

    def value_tensor(self, device: torch.device | str) -> torch.Tensor:
        """The budget's value as a 0-d tensor: compiled code reads it as data, so sweeping
        ratios reuses one graph instead of compiling one per value."""
        if self.compression_ratio is not None:
            return torch.tensor(float(self.compression_ratio), dtype=torch.float64, device=device)
        return torch.tensor(int(self.budget), dtype=torch.int64, device=device)

    def describe(self) -> str:
        if self.compression_ratio is not None:
            return f"compression_ratio={self.compression_ratio}"
        return f"budget={self.budget}"

    def kept_tensor(self, counts: torch.Tensor) -> torch.Tensor:
        """Vectorised :meth:`kept` for per-row counts (int64)."""
        return kept_counts(self.kind, self.value_tensor(counts.device), counts)


def kept_counts(kind: str, value: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Pure tensor form of :meth:`Budget.kept`. float64 reproduces Python's float arithmetic,
    so the tensor and Python rules never disagree by one."""
    if kind == "ratio":
        kept = torch.floor(counts.to(torch.float64) * (1 - value)).to(torch.int64)
        return torch.minimum(kept.clamp(min=1), counts)
    return torch.minimum(counts, value)

"""Cache layers that grow in place while decoding, instead of copying themselves at every token.

Why: transformers' ``DynamicLayer.update`` concatenates each new token onto the layer's keys and
values, a copy of the whole layer per decoding step. After compression that copy is what stands
between mask mode and evict mode: mask mode keeps the whole cache, so it copied 4x the tokens
per step at 75% removed (at 8000 tokens on SmolLM2, ``aten::cat`` took half of a mask-mode
step; docs/benchmarks.md). A layer our press compresses is switched to
:class:`GrowingDynamicLayer` (the same object, :func:`grow_in_place`): its keys and values are
views of buffers with some headroom (:func:`headroom`), a step writes the new token into the
headroom and hands out a view one token longer. A full buffer is copied once into a larger one.

The rule that keeps this invisible: **a tensor the layer has handed out is never written within
its extent.** Stock ``DynamicLayer`` never writes into a tensor it handed out (``cat`` makes a new
one), and code relies on it: snapshots of ``layer.keys`` kept by reference (the context pass,
prefix caches, kvpress' cache reuse). Each buffer has one :class:`_Growth` record, the only
writer of that buffer; it writes only past the end of the views it handed out, and only while
the layer's ``keys`` and ``values`` *are* its latest views. If anything replaced them (eviction,
``crop``, a beam reorder, a restored snapshot, offloading, a shallow copy that appended first),
the next update copies into a new buffer. Anything unusual (tensors that need autograd, another
dtype, device or batch shape, an uninitialised layer) takes the parent's concatenation, so
errors and results stay transformers' own.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

#: Headroom bounds (tokens) of a buffer: ``length / HEADROOM_FRACTION`` clamped to these. At
#: most 1/16 more memory than the tokens held, and one copy of the layer per >= 16 steps
#: (>= 256 steps on long contexts) instead of one per step.
MIN_HEADROOM, MAX_HEADROOM, HEADROOM_FRACTION = 16, 256, 16


def headroom(length: int) -> int:
    """Free slots a new buffer holding ``length`` tokens gets."""
    return min(MAX_HEADROOM, max(MIN_HEADROOM, length // HEADROOM_FRACTION))


class _Growth:
    """One pair of buffers and the views of them last handed out (``length`` tokens filled).

    Mutable and shared on purpose: a snapshot of the layer's ``__dict__`` holds this same record,
    whose latest views then are not the snapshot's, so a restored snapshot copies instead of
    writing over tokens handed out since."""

    __slots__ = ("key_buffer", "value_buffer", "length", "keys", "values")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor):
        old = keys.shape[-2]
        self.length = old + new_keys.shape[-2]
        self.key_buffer = _buffer_of(keys, new_keys, self.length + headroom(self.length))
        self.value_buffer = _buffer_of(values, new_values, self.length + headroom(self.length))
        self._hand_out()

    def _hand_out(self) -> None:
        self.keys = self.key_buffer[..., : self.length, :]
        self.values = self.value_buffer[..., : self.length, :]

    def continues(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Are ``keys``/``values`` this record's latest views, in a buffer this mode may write?"""
        if keys is not self.keys or values is not self.values:
            return False
        # An inference tensor cannot be written outside inference mode (`generate` runs in no_grad)
        return torch.is_inference_mode_enabled() or not self.key_buffer.is_inference()

    def append(self, new_keys: torch.Tensor, new_values: torch.Tensor) -> bool:
        """Write the new tokens into the headroom; ``False`` if they do not fit."""
        end = self.length + new_keys.shape[-2]
        if end > self.key_buffer.shape[-2]:
            return False
        self.key_buffer[..., self.length : end, :] = new_keys
        self.value_buffer[..., self.length : end, :] = new_values
        self.length = end
        self._hand_out()
        return True


def _buffer_of(old: torch.Tensor, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """A fresh ``[..., capacity, D]`` buffer starting with ``old`` then ``new`` (made in the
    current inference mode, so that this mode may write into it later)."""
    buffer = torch.empty(*old.shape[:-2], capacity, old.shape[-1], dtype=old.dtype, device=old.device)
    buffer[..., : old.shape[-2], :] = old
    buffer[..., old.shape[-2] : old.shape[-2] + new.shape[-2], :] = new
    return buffer


def _plain(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Can ``new`` extend ``old`` in a buffer exactly as ``torch.cat(dim=-2)`` would? (Same
    leading shape and head size: a buffer write would broadcast where ``cat`` raises.)"""
    return (
        isinstance(old, torch.Tensor) and old.dim() == 4 and new.dim() == 4 and old.numel() > 0
        and old.shape[:-2] == new.shape[:-2] and old.shape[-1] == new.shape[-1]
        and old.dtype == new.dtype and old.device == new.device
        and not (torch.is_grad_enabled() and (old.requires_grad or new.requires_grad))
    )


class GrowingDynamicLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``update`` writes into headroom instead of concatenating (see the
    module docstring for the rule that makes it safe). Saved contexts record it as a
    ``DynamicLayer``: the stored tensors are the same."""

    saved_kind = "DynamicLayer"

    def __setattr__(self, name: str, value: Any) -> None:
        # Keys or values replaced by anything but the record's latest views (an eviction by
        # decoding-time compression, a beam reorder, a crop...): the record is stale, and it
        # alone would keep the old buffers alive (after a decoding compression the layer held
        # its pre-eviction buffer as well as the kept tokens: 2.3x the memory of the cache until
        # the next token, for good when decoding stopped there). The next update starts afresh.
        if name in ("keys", "values"):
            growth = self.__dict__.get("_growth")
            if growth is not None and value is not getattr(growth, name):
                del self.__dict__["_growth"]
        super().__setattr__(name, value)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values = getattr(self, "keys", None), getattr(self, "values", None)
        if not (self.is_initialized and _plain(keys, key_states) and _plain(values, value_states)):
            self.__dict__.pop("_growth", None)
            return super().update(key_states, value_states, *args, **kwargs)
        growth = self.__dict__.get("_growth")
        if growth is None or not growth.continues(keys, values) or not growth.append(key_states, value_states):
            growth = self._growth = _Growth(keys, values, key_states, value_states)
        self.keys, self.values = growth.keys, growth.values
        return self.keys, self.values


def grow_in_place(layer: Any) -> None:
    """Switch a plain transformers ``DynamicLayer`` to :class:`GrowingDynamicLayer`; any other
    layer (sliding-window, quantized, offloaded, ...) is left as it is. Called after every
    compression (a growing layer whose keys were replaced has already dropped its old buffers:
    see ``GrowingDynamicLayer.__setattr__``)."""
    if type(layer) is DynamicLayer:
        layer.__class__ = GrowingDynamicLayer


def flat_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[B, H, L, D]`` -> ``(flat[N, D], row)``: token ``t`` of row-head ``r = b * H + h`` is
    ``flat[r * row + t]``. A view (no copy) of a contiguous tensor or of a growing layer's
    buffer, whose row-heads lie ``capacity`` tokens apart; a contiguous copy of anything else."""
    batch, heads, length, dim = tensor.shape
    s0, s1, s2, s3 = tensor.stride()
    row = s1 // dim if heads > 1 else (s0 // dim if batch > 1 else length)
    if (
        (s3 == 1 or dim == 1) and (s2 == dim or length == 1) and row >= length
        and (heads == 1 or s1 == row * dim) and (batch == 1 or s0 == heads * row * dim)
    ):
        return tensor.as_strided(((batch * heads - 1) * row + length, dim), (dim, 1)), row
    return tensor.reshape(batch * heads * length, dim), length

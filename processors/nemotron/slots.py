"""The fast path's per-stream slots: pooled state tensors, leases, and reading a step's tokens back.

Every stream on the fast path owns a *slot*, one row of preallocated pools (encoder caches,
prediction-network state and output); slot 0 is scratch, written by padding rows and never read.
:class:`SlotLease` is a stream's claim on its slot; :class:`PendingTokens` holds a launched step's
labels until the host reads them.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import numpy as np
import torch

__all__ = ["PendingTokens", "Rows", "SlotLease", "SlotOwner", "SlotPools", "batch_dim"]


class SlotOwner(Protocol):
    """What a lease needs from the stepper that owns the pools (``graphs.FastStepper``)."""

    def slot_rows(self, slot: int) -> dict[str, torch.Tensor]: ...

    def _free_slot(self, slot: int) -> None: ...


class SlotLease:
    """A stream's claim on one slot of the pools; released on reset or when the stream is gone."""

    def __init__(self, stepper: SlotOwner, slot: int):
        self.slot = slot
        self._stepper = stepper
        self._release = weakref.finalize(self, stepper._free_slot, slot)

    def rows(self) -> dict[str, torch.Tensor]:
        """This slot's rows of the pools (views)."""
        return self._stepper.slot_rows(self.slot)

    def release(self) -> None:
        self._release()

    @property
    def alive(self) -> bool:
        return self._release.alive


class SlotPools:
    """Per-slot state: encoder caches (attention rings, convolution windows, frame counts) and the
    prediction network's state and output (see ``processors.nemotron.encoder_step``)."""

    def __init__(self, capacity: int, like: dict[str, torch.Tensor]):
        self.capacity = capacity
        # like[name] has the batch on dimension 1 (caches, LSTM state) or 0 (counts, outputs)
        self.tensors = {
            name: torch.zeros(with_batch(t, capacity, batch_dim(name)), dtype=t.dtype, device=t.device)
            for name, t in like.items()
        }

    def nbytes_per_slot(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) // self.capacity


class Rows:
    """A step's rows of the pools: views of slots ``start ..`` (one aligned run, in order) or, with
    ``start`` None, gathered and scattered through ``slots`` (padding rows: scratch slot 0)."""

    def __init__(self, slots: torch.Tensor, start: int | None):
        self.slots, self.start = slots, start

    def read(self, pool: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.start is not None:
            return pool.narrow(dim, self.start, self.slots.numel())
        return pool.index_select(dim, self.slots)

    def write(self, pool: torch.Tensor, value: torch.Tensor, dim: int = 0) -> None:
        if self.start is not None:
            pool.narrow(dim, self.start, value.shape[dim]).copy_(value)
        else:
            pool.index_copy_(dim, self.slots, value.to(pool.dtype))


_BATCH_DIM = {"channel": 1, "time": 1, "count": 0, "h": 1, "c": 1, "dec_out": 0}


def batch_dim(name: str) -> int:
    """The batch dimension of pool ``name``."""
    return _BATCH_DIM[name]


def with_batch(t: torch.Tensor, batch: int, dim: int) -> list[int]:
    shape = list(t.shape)
    shape[dim] = batch
    return shape


class PendingTokens:
    """The labels of a launched step, read back (the step's one synchronisation) on demand."""

    def __init__(self, parts: list[torch.Tensor], blank: int):
        self._parts, self._blank = parts, blank

    def tokens(self) -> list[list[int]]:
        """Per stream its new non-blank token ids, in order."""
        out: list[list[int]] = []
        for part in self._parts:
            labels = part.cpu().numpy()
            emitted = labels != self._blank
            flat = labels[emitted].tolist()
            ends = np.cumsum(emitted.sum(axis=1)).tolist()
            out += [flat[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        return out

    def emitted(self) -> tuple[list[int], list[list[int]]]:
        """The rows (streams, in launch order) that emitted, and per such row its new token ids."""
        rows: list[int] = []
        out: list[list[int]] = []
        offset = 0
        for part in self._parts:
            labels = part.cpu().numpy()
            emitted = labels != self._blank
            counts = emitted.sum(axis=1)
            hit = np.flatnonzero(counts)
            flat = labels[emitted].tolist()
            ends = np.cumsum(counts[hit]).tolist()
            out += [flat[a:b] for a, b in zip([0, *ends[:-1]], ends)]
            rows += (hit + offset).tolist()
            offset += labels.shape[0]
        return rows, out

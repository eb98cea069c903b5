"""The mel frames of one step's batch of streams, from their raw samples.

Every step recomputes its mel frames from the 16 kHz samples around them (see
``processors.nemotron.engine``), for all streams of a step (or of one part of a large step) in one
preprocessor call. The samples go to the GPU through reused page-locked buffers, in one
asynchronous copy; a few buffers take turns, so the parts of one step can be staged while the
GPU still steps the parts before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from processors.nemotron.stream import StepBatch


class MelBatcher:
    """Turns a step's batch into a [B, features, T] mel batch and its lengths; one per engine.

    Not thread-safe: the engine calls it under its lock.
    """

    BUFFERS = 3  # staging buffers taking turns (parts of one step in flight at once)

    def __init__(self, preprocessor, device: torch.device):
        self._preprocessor = preprocessor
        self.device = device
        self._staging: list[torch.Tensor | None] = [None] * self.BUFFERS  # host buffers of the samples
        self._staged: list[torch.cuda.Event | None] = [None] * self.BUFFERS  # the last copy out of each
        self._device: list[torch.Tensor | None] = [None] * self.BUFFERS  # their device copies (CUDA)
        self._consumed: list[torch.cuda.Event | None] = [None] * self.BUFFERS  # the last read of each device copy
        self._copies = None  # CUDA stream of the copies: a part's samples go up while the GPU steps the last part
        self._turn = 0

    def __call__(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's mel frames as one [B, features, T] batch (zero-padded) and their lengths.

        Frames are exactly what a whole-utterance preprocessor pass computes: one batched call,
        and a kept frame never reaches past its own stream's samples, so the zero padding of
        shorter rows does not touch it.
        """
        n, width = len(batch), int(batch.sizes.max())
        size = n * width + 2 * n  # samples, then each stream's sample count and frame count
        turn = self._turn
        self._turn = (turn + 1) % self.BUFFERS
        host = self._host_buffer(turn, size).narrow(0, 0, size)
        staged_host = host.numpy()
        rows = staged_host[: n * width].reshape(n, width)
        if (batch.sizes == width).all():
            np.concatenate(batch.samples, out=staged_host[: n * width])  # rows back to back (faster than np.stack)
        else:
            for row, samples in zip(rows, batch.samples):
                row[: samples.size] = samples
                row[samples.size :] = 0.0
        staged_host[n * width : n * width + n] = batch.sizes  # exact in float32 (< 2**24)
        staged_host[n * width + n :] = batch.count
        staged = self._upload(turn, host)
        signal = staged[: n * width].view(n, width)
        sizes = staged[n * width : n * width + n].long()
        lengths = staged[n * width + n :].long()
        with torch.inference_mode():
            mel, _ = self._preprocessor(input_signal=signal, length=sizes)
        if self.device.type == "cuda":  # the device copy may be refilled once the preprocessor has read it
            self._consumed[turn] = torch.cuda.Event()
            self._consumed[turn].record()
        skip, count = int(batch.skip[0]), int(batch.count[0])
        if (batch.skip == skip).all() and (batch.count == count).all():
            return mel[:, :, skip : skip + count], lengths  # steady state
        frames = torch.zeros(n, mel.shape[1], int(batch.count.max()), dtype=mel.dtype, device=mel.device)
        for i, (skip, count) in enumerate(zip(batch.skip.tolist(), batch.count.tolist())):
            frames[i, :, :count] = mel[i, :, skip : skip + count]
        return frames, lengths

    def _upload(self, turn: int, host: torch.Tensor) -> torch.Tensor:
        """``host`` on the device: one asynchronous copy from page-locked memory, on a stream of
        its own (the compute stream waits for it, not the other way round)."""
        if self.device.type != "cuda":
            return host
        if self._copies is None:
            self._copies = torch.cuda.Stream()
        device = self._device[turn]
        if device is None or device.numel() < host.numel():
            device = self._device[turn] = torch.empty(self._staging[turn].numel(), device=self.device)
            self._consumed[turn] = None
        if self._consumed[turn] is not None:
            self._copies.wait_event(self._consumed[turn])
        with torch.cuda.stream(self._copies):
            device[: host.numel()].copy_(host, non_blocking=True)
            self._staged[turn] = torch.cuda.Event()
            self._staged[turn].record()
        torch.cuda.current_stream().wait_event(self._staged[turn])
        return device[: host.numel()]

    def reserve(self, streams: int, samples: int) -> None:
        """Allocate the host buffers for ``streams`` jobs of ``samples`` each now (page-locking
        tens of MB takes tens of ms: at warm-up, not in the first large step)."""
        for turn in range(self.BUFFERS):
            self._host_buffer(turn, streams * samples + 2 * streams)

    def _host_buffer(self, turn: int, size: int) -> torch.Tensor:
        """Reusable float32 host buffer ``turn``, of at least ``size`` (page-locked when the model
        is on a GPU). Before it is refilled, the previous copy out of it must be over (``_staged``).
        """
        if self._staged[turn] is not None:
            self._staged[turn].synchronize()
        old = self._staging[turn]
        if old is None or old.numel() < size:
            pinned = self.device.type == "cuda"
            self._staging[turn] = torch.empty(max(size, 2 * (0 if old is None else old.numel())), pin_memory=pinned)
        return self._staging[turn]

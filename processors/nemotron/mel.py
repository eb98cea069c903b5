"""The mel frames of one step's batch of streams, from their raw samples.

Every step recomputes its mel frames from the 16 kHz samples around them (see
``processors.nemotron.engine``), for all streams of a step in one preprocessor call. The samples
go to the GPU through one reused page-locked buffer, in one asynchronous copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from processors.nemotron.stream import StepJob


class MelBatcher:
    """Turns a step's jobs into a [B, features, T] mel batch and its lengths; one per engine.

    Not thread-safe: the engine calls it under its lock.
    """

    def __init__(self, preprocessor, device: torch.device):
        self._preprocessor = preprocessor
        self.device = device
        self._staging: torch.Tensor | None = None  # host buffer of the next step's samples
        self._staged: torch.cuda.Event | None = None  # the last copy out of it

    def __call__(self, jobs: Sequence[StepJob]) -> tuple[torch.Tensor, torch.Tensor]:
        """The jobs' mel frames as one [B, features, T] batch (zero-padded) and their lengths.

        Frames are exactly what a whole-utterance preprocessor pass computes: one batched call,
        and a kept frame never reaches past its own job's samples, so the zero padding of
        shorter rows does not touch it.
        """
        n, width = len(jobs), max(job.samples.size for job in jobs)
        size = n * width + 2 * n  # samples, then each job's sample count and frame count
        host = self._host_buffer(size).narrow(0, 0, size)
        batch = host.numpy()[: n * width].reshape(n, width)
        if all(job.samples.size == width for job in jobs):
            np.stack([job.samples for job in jobs], out=batch)
        else:
            for row, job in zip(batch, jobs):
                row[: job.samples.size] = job.samples
                row[job.samples.size :] = 0.0
        counts = [job.count for job in jobs]
        host.numpy()[n * width :] = [job.samples.size for job in jobs] + counts  # exact in float32 (< 2**24)
        staged = host.to(self.device, non_blocking=True)  # pinned on CUDA: one asynchronous copy
        if self.device.type == "cuda":
            self._staged = torch.cuda.Event()
            self._staged.record()
        signal = staged[: n * width].view(n, width)
        sizes = staged[n * width : n * width + n].long()
        lengths = staged[n * width + n :].long()
        with torch.inference_mode():
            mel, _ = self._preprocessor(input_signal=signal, length=sizes)
        if all(job.skip == jobs[0].skip and job.count == counts[0] for job in jobs):
            return mel[:, :, jobs[0].skip : jobs[0].skip + counts[0]], lengths  # steady state
        frames = torch.zeros(len(jobs), mel.shape[1], max(counts), dtype=mel.dtype, device=mel.device)
        for i, job in enumerate(jobs):
            frames[i, :, : job.count] = mel[i, :, job.skip : job.skip + job.count]
        return frames, lengths

    def reserve(self, streams: int, samples: int) -> None:
        """Allocate the host buffer for ``streams`` jobs of ``samples`` each now (page-locking
        tens of MB takes tens of ms: at warm-up, not in the first large step)."""
        self._host_buffer(streams * samples + 2 * streams)

    def _host_buffer(self, size: int) -> torch.Tensor:
        """A reusable float32 host buffer of at least ``size`` (page-locked when the model is on a GPU).

        Before it is refilled, the previous copy out of it must be over (``_staged``).
        """
        if self._staged is not None:
            self._staged.synchronize()
        if self._staging is None or self._staging.numel() < size:
            pinned = self.device.type == "cuda"
            self._staging = torch.empty(max(size, 2 * (0 if self._staging is None else self._staging.numel())), pin_memory=pinned)
        return self._staging

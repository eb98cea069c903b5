"""PCM handling for the streaming ASR engine: conversion, resampling and a bounded sample window.

Synchronous, numpy only. The engine keeps, per stream, just the samples that future mel frames
still need (a few hundred milliseconds), never the whole call.
"""

from __future__ import annotations

import numpy as np

MODEL_SAMPLE_RATE = 16000


class AudioFormatError(ValueError):
    """Audio handed to the engine cannot be interpreted (wrong type, rate or shape)."""


def pcm_to_float(pcm: np.ndarray | bytes | bytearray | memoryview, carry: bytes = b"") -> tuple[np.ndarray, bytes]:
    """Convert mono PCM to float32 in [-1, 1]; returns (samples, odd trailing byte to carry).

    Accepts little-endian int16 bytes (an odd trailing byte is carried to the next call), an
    int16 array, or a float array in [-1, 1]. NaN becomes 0 and +/-inf or out-of-range values
    are clipped, so a broken upstream can never poison the model's caches.
    """
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raw = carry + bytes(pcm)
        usable = len(raw) - (len(raw) % 2)
        samples = np.frombuffer(raw[:usable], dtype="<i2").astype(np.float32) / 32768.0
        return samples, raw[usable:]
    arr = np.asarray(pcm)
    if arr.ndim != 1:
        if arr.ndim == 2 and 1 in arr.shape:
            arr = arr.reshape(-1)
        else:
            raise AudioFormatError(f"expected mono audio (one channel), got an array of shape {arr.shape}")
    if arr.dtype == np.int16:
        return arr.astype(np.float32) / 32768.0, carry
    if np.issubdtype(arr.dtype, np.floating):
        out = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
        return np.clip(out, -1.0, 1.0), carry
    raise AudioFormatError(f"expected int16 PCM or float samples, got dtype {arr.dtype}")


class Resampler:
    """Streaming resampler to the model rate (soxr), or a pass-through at 16 kHz."""

    def __init__(self, in_rate: int):
        if not isinstance(in_rate, int) or in_rate < 4000 or in_rate > 384000:
            raise AudioFormatError(f"sample rate {in_rate!r} is not supported; send 16000 Hz mono (4000-384000 accepted)")
        self.in_rate = in_rate
        self._stream = None
        if in_rate != MODEL_SAMPLE_RATE:
            import soxr

            self._stream = soxr.ResampleStream(in_rate, MODEL_SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)

    def reset(self) -> None:
        if self._stream is not None:
            self._stream.clear()


class SampleWindow:
    """The tail of a stream's 16 kHz samples, addressed by absolute sample index."""

    def __init__(self) -> None:
        self.base = 0  # absolute index of the first kept sample
        self.total = 0  # samples received so far
        self._samples = np.zeros(0, dtype=np.float32)
        self._offset = 0  # forgotten samples still at the front of the array

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._samples = np.concatenate([self._samples[self._offset :], samples.astype(np.float32, copy=False)])
            self._offset = 0
            self.total += int(samples.size)

    def slice(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) in absolute indices; start must not precede the kept base."""
        if start < self.base or end > self.total:
            raise IndexError(f"samples [{start}, {end}) are outside the kept window [{self.base}, {self.total})")
        first = self._offset + start - self.base
        return self._samples[first : first + end - start]

    def forget_before(self, start: int) -> None:
        """Drop samples before absolute index ``start`` (they are no longer needed)."""
        start = min(max(start, self.base), self.total)
        self._offset += start - self.base
        self.base = start

    @property
    def nbytes(self) -> int:
        """Bytes of the samples still kept (what the next append leaves in memory)."""
        return int(self._samples[self._offset :].nbytes)

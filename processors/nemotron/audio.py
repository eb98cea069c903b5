"""PCM handling for the streaming ASR engine: conversion, resampling and a bounded sample window.

Synchronous, numpy only. The engine keeps, per stream, just the samples that future mel frames
still need (a few hundred milliseconds), never the whole call.
"""

from __future__ import annotations

import numpy as np

MODEL_SAMPLE_RATE = 16000


class AudioFormatError(ValueError):
    """Audio handed to the engine cannot be interpreted (wrong type, rate or shape)."""


def pcm16_of(pcm: np.ndarray | bytes | bytearray | memoryview, carry: bytes = b"") -> tuple[np.ndarray | None, bytes]:
    """The int16 samples of little-endian 16-bit PCM bytes (an odd trailing byte carried to the
    next call) or of a 1-D int16 array, and the new carry; None for any other input."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raw = carry + bytes(pcm)
        usable = len(raw) - (len(raw) % 2)
        return np.frombuffer(raw[:usable], dtype="<i2"), raw[usable:]
    if isinstance(pcm, np.ndarray) and pcm.dtype == np.int16 and pcm.ndim == 1:
        return pcm, carry
    return None, carry


def pcm_to_float(pcm: np.ndarray | bytes | bytearray | memoryview, carry: bytes = b"") -> tuple[np.ndarray, bytes]:
    """Convert mono PCM to float32 in [-1, 1]; returns (samples, odd trailing byte to carry).

    Accepts little-endian int16 bytes (an odd trailing byte is carried to the next call), an
    int16 array, or a float array in [-1, 1]. NaN becomes 0 and +/-inf or out-of-range values
    are clipped, so a broken upstream can never poison the model's caches.
    """
    pcm16, carry = pcm16_of(pcm, carry)
    if pcm16 is not None:
        return pcm16.astype(np.float32) / 32768.0, carry
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

    @property
    def passes_through(self) -> bool:
        """Whether the input is at the model rate already (samples come out as they went in)."""
        return self._stream is None

    def reset(self) -> None:
        if self._stream is not None:
            self._stream.clear()


class SampleWindow:
    """The tail of a stream's 16 kHz samples, addressed by absolute sample index.

    The samples sit in one buffer with room to spare: an append writes behind the last sample
    (int16 PCM converted on the way in, no intermediate array); only a full buffer is replaced,
    by a new one holding the kept samples. A buffer is never written before its end, so a slice
    stays what it was across later appends and forgets.
    """

    SPARE = 8192  # samples of room beyond twice what a new buffer must hold

    def __init__(self) -> None:
        self.base = 0  # absolute index of the first kept sample
        self.total = 0  # samples received so far
        self._samples = np.zeros(0, dtype=np.float32)
        self._offset = 0  # forgotten samples still at the front of the buffer
        self._end = 0  # buffer index behind the last sample

    def append(self, samples: np.ndarray) -> None:
        """Append float samples (float32 kept as they are)."""
        if samples.size:
            self._room(samples.size)[:] = samples

    def append_pcm16(self, pcm: np.ndarray) -> None:
        """Append int16 PCM as float32 in [-1, 1): exactly ``pcm.astype(np.float32) / 32768.0``."""
        if pcm.size:
            np.multiply(pcm, _PCM16_SCALE, out=self._room(pcm.size))

    def _room(self, n: int) -> np.ndarray:
        """The buffer's next ``n`` samples, counted as received (the caller fills them)."""
        if self._end + n > self._samples.size:
            kept = self._end - self._offset
            grown = np.empty(2 * (kept + n) + self.SPARE, dtype=np.float32)
            grown[:kept] = self._samples[self._offset : self._end]
            self._samples, self._offset, self._end = grown, 0, kept
        room = self._samples[self._end : self._end + n]
        self._end += n
        self.total += n
        return room

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
        """Bytes of the samples still kept (the buffer holds at most about twice as many, plus
        one append and ``SPARE``)."""
        return 4 * (self.total - self.base)


_PCM16_SCALE = np.float32(1.0 / 32768.0)  # a power of two: the product equals the division

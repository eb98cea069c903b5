"""Speech segments of a recorded channel, as Full-Duplex-Bench v1.5 takes them.

Silero VAD (the ONNX model inside the pipecat wheel) scores every 32 ms window of a 16 kHz
channel; windows over :data:`THRESHOLD` are speech (with a lower threshold to stay in speech, as
Silero's own ``get_speech_timestamps`` does), segments shorter than :data:`MIN_SPEECH_S` are
dropped, and segments are merged across short gaps: the caller's across 0.6 s, Annie's across
0.5 s (FD-Bench v1.5 ``get_timing.py``). Times are seconds on the channel's timeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RATE = 16000
WINDOW = 512  # samples: 32 ms
THRESHOLD = 0.5
NEG_THRESHOLD = 0.35
MIN_SPEECH_S = 0.1
CALLER_MERGE_S = 0.6
ANNIE_MERGE_S = 0.5


@dataclass(frozen=True)
class Segment:
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def _model():
    from importlib import resources

    from pipecat.audio.vad.silero import SileroOnnxModel

    path = resources.files("pipecat.audio.vad.data").joinpath("silero_vad.onnx")
    return SileroOnnxModel(str(path), force_onnx_cpu=True)


def speech_probabilities(samples: np.ndarray) -> np.ndarray:
    """Silero's speech probability for each 32 ms window of int16 16 kHz audio."""
    model = _model()
    n = len(samples) // WINDOW
    audio = samples[: n * WINDOW].astype(np.float32) / 32768.0
    probs = np.empty(n, dtype=np.float32)
    for i in range(n):
        probs[i] = float(np.asarray(model(audio[i * WINDOW : (i + 1) * WINDOW], RATE)).ravel()[0])
    return probs


def speech_segments(samples: np.ndarray, merge_gap_s: float, t0: float = 0.0) -> list[Segment]:
    """Speech segments of int16 16 kHz audio whose first sample is at time ``t0``."""
    probs = speech_probabilities(samples)
    step = WINDOW / RATE
    raw: list[Segment] = []
    start: float | None = None
    for i, p in enumerate(probs):
        if start is None and p >= THRESHOLD:
            start = i * step
        elif start is not None and p < NEG_THRESHOLD:
            raw.append(Segment(t0 + start, t0 + i * step))
            start = None
    if start is not None:
        raw.append(Segment(t0 + start, t0 + len(probs) * step))
    return merge([s for s in raw if s.duration >= MIN_SPEECH_S], merge_gap_s)


def merge(segments: list[Segment], gap_s: float) -> list[Segment]:
    out: list[Segment] = []
    for seg in segments:
        if out and seg.start - out[-1].end <= gap_s:
            out[-1] = Segment(out[-1].start, max(out[-1].end, seg.end))
        else:
            out.append(seg)
    return out


def covering(segments: list[Segment], t: float, slack_s: float = 0.0) -> Segment | None:
    """The segment that is under way at ``t`` (started before it, ends after it)."""
    for seg in segments:
        if seg.start - slack_s <= t <= seg.end + slack_s:
            return seg
    return None


def first_after(segments: list[Segment], t: float, before: float = float("inf")) -> Segment | None:
    for seg in segments:
        if t <= seg.start < before:
            return seg
    return None


def total_in(segments: list[Segment], start: float, end: float) -> float:
    """Seconds of speech inside ``[start, end]``."""
    return sum(max(0.0, min(s.end, end) - max(s.start, start)) for s in segments)

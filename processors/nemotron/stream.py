"""Per-stream state of the streaming engine, and the batch plumbing and step of the eager path.

:class:`StreamState` is everything one call needs between steps (audio window, encoder caches
or the fast path's slot, the turn's hypothesis); :class:`BatchCaches` holds the encoder caches
of a batch of streams on the eager path; :class:`StepBatch` is a batch of streams' input to one step.
None of them references the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from processors.nemotron.audio import MODEL_SAMPLE_RATE, Resampler, SampleWindow


@dataclass
class StreamState:
    """Everything one stream (one call) needs between steps; no engine references.

    Memory is bounded: the sample window keeps only what the next mel frames need, the
    encoder caches have a fixed size, and the hypothesis holds the tokens of the current turn.
    """

    sample_rate: int = MODEL_SAMPLE_RATE
    window: SampleWindow = field(default_factory=SampleWindow)
    resampler: Resampler | None = None
    carry: bytes = b""  # an odd trailing byte of int16 PCM
    frames_done: int = 0  # mel frames already fed to the encoder
    steps: int = 0
    # Encoder caches: this stream's row of the batch tensors its last step produced, so that
    # the same streams stepped together again need no gathering (see BatchCaches).
    caches: BatchCaches | None = None
    row: int = 0
    hypothesis: Any = None  # NeMo Hypothesis of the current turn (eager path)
    lease: Any = None  # the fast path's slot (processors.nemotron.graphs.SlotLease)
    tokens: list[int] = field(default_factory=list)  # the fast path's token ids of the turn
    decoded: Any = None  # the fast path's text decoding state (processors.nemotron.text.TurnText)
    text: str = ""
    audio_s: float = 0.0  # seconds of audio received since the last reset

    def __post_init__(self) -> None:
        if self.resampler is None:
            self.resampler = Resampler(self.sample_rate)

    def reset(self) -> None:
        """Forget the turn: audio, caches and hypothesis (the sample rate stays)."""
        self.window = SampleWindow()
        self.resampler.reset()
        self.carry = b""
        self.frames_done = 0
        self.steps = 0
        self.caches = None
        self.row = 0
        self.hypothesis = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self.tokens = []
        self.decoded = None
        self.text = ""
        self.audio_s = 0.0

    def _rows(self) -> tuple[torch.Tensor, ...]:
        if self.lease is not None:
            rows = self.lease.rows()
            return rows["channel"], rows["time"], rows["count"], rows["h"], rows["c"], rows["dec_out"]
        return () if self.caches is None else self.caches.rows(self.row)

    @property
    def nbytes(self) -> int:
        """Bytes held by the audio window and the encoder caches (not the turn's tokens)."""
        return self.window.nbytes + sum(int(c.numel() * c.element_size()) for c in self._rows())

    @property
    def cache_channel(self) -> torch.Tensor | None:
        rows = self._rows()
        return rows[0] if rows else None

    @property
    def cache_time(self) -> torch.Tensor | None:
        rows = self._rows()
        return rows[1] if rows else None

    @property
    def num_tokens(self) -> int:
        if self.lease is not None or self.tokens:
            return len(self.tokens)
        return 0 if self.hypothesis is None else len(self.hypothesis.y_sequence)


@dataclass(eq=False)
class BatchCaches:
    """Encoder caches of a batch of streams: [layers, B, ...] tensors and lengths [B]."""

    channel: torch.Tensor
    time: torch.Tensor
    length: torch.Tensor

    def rows(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.channel[:, row : row + 1], self.time[:, row : row + 1], self.length[row : row + 1]

    @staticmethod
    def gather(states: Sequence[StreamState]) -> BatchCaches:
        """The batch for ``states``: reused as is when they are the last step's batch in order."""
        first = states[0].caches
        if first.channel.shape[1] == len(states) and all(
            s.caches is first and s.row == i for i, s in enumerate(states)
        ):
            return first
        rows = [s.caches.rows(s.row) for s in states]
        return BatchCaches(*(torch.cat([r[k] for r in rows], dim=1 if k < 2 else 0) for k in range(3)))


@dataclass(frozen=True)
class FrameGeometry:
    """How mel frames map to 16 kHz samples, and the encoder's history rule (engine constants)."""

    hop: int  # samples per frame
    half_fft: int  # samples after a frame's start that its window reaches
    left_frames: int  # frames before a frame whose samples its window (and pre-emphasis) can reach
    pre_cache: int  # history frames a later step re-reads (pre_encode_cache_size)


def step_windows(geometry: FrameGeometry, done: np.ndarray, ends: np.ndarray, totals: np.ndarray) -> dict[str, np.ndarray]:
    """Per stream of a step, vectorised: its input frames [start, end) and the samples behind them. ``done``: frames already encoded; ``ends``: the step's end
    frame; ``totals``: samples received.

    The input starts ``pre_cache`` frames before the new ones (at frame 0 while fewer exist, and
    on a first step, where ``done`` is 0); its samples reach ``left_frames`` further back and end
    where the last frame's window ends or the audio does. Returns ``window_start``, ``sizes``
    (samples), ``skip`` (window frames before the first input frame) and ``count`` (input frames).
    """
    g = geometry
    start = np.maximum(done - g.pre_cache, 0)
    window_start = np.maximum(start - g.left_frames, 0) * g.hop
    window_end = np.minimum(totals, (ends - 1) * g.hop + g.half_fft)
    return {
        "window_start": window_start,
        "sizes": window_end - window_start,
        "skip": start - window_start // g.hop,
        "count": ends - start,
    }


@dataclass
class StepBatch:
    """One encoder step's input for a batch of streams (all with the same first-step flag and drop)."""

    states: list[StreamState]
    samples: list[np.ndarray]  # per stream the 16 kHz samples behind its frames
    sizes: np.ndarray  # their lengths
    skip: np.ndarray  # window frames before the first wanted one
    count: np.ndarray  # mel frames wanted (history plus new)
    ends: np.ndarray  # the frame count of each stream after the step
    first: bool
    drop: int  # subsampled history frames to drop (drop_extra_pre_encoded)

    def __len__(self) -> int:
        return len(self.states)

    def part(self, lo: int, hi: int) -> StepBatch:
        """Streams ``lo .. hi - 1`` of the batch."""
        return StepBatch(
            self.states[lo:hi], self.samples[lo:hi], self.sizes[lo:hi], self.skip[lo:hi], self.count[lo:hi],
            self.ends[lo:hi], self.first, self.drop,
        )


def eager_stream_step(model, states: Sequence[StreamState], inputs, lengths, keep_all: bool, first: bool, drop: int) -> None:
    """NeMo's own ``conformer_stream_step`` for a batch of streams: their caches, hypotheses and
    texts are updated (the caller holds inference mode and autocast, and advances the frames)."""
    if all(s.caches is None for s in states):
        caches = BatchCaches(*model.encoder.get_initial_cache_state(batch_size=len(states), device=inputs.device))
    else:  # a group mixes only streams past their first step (first steps form their own)
        caches = BatchCaches.gather(states)
    result = model.conformer_stream_step(
        processed_signal=inputs,
        processed_signal_length=lengths,
        cache_last_channel=caches.channel,
        cache_last_time=caches.time,
        cache_last_channel_len=caches.length,
        keep_all_outputs=keep_all,
        previous_hypotheses=None if first else [s.hypothesis for s in states],
        drop_extra_pre_encoded=drop,
        return_transcription=True,
    )
    _, _, channel, time_cache, cache_len, best = result
    produced = BatchCaches(channel, time_cache, cache_len)
    for i, s in enumerate(states):
        s.caches, s.row = produced, i
        s.hypothesis = best[i]
        s.text = best[i].text if isinstance(best[i].text, str) else ""

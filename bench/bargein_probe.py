"""The partial transcripts the barge-in benchmark needs without a streaming model.

- :class:`PartialWhisperSTTService`: pipecat's Whisper service (the agent's fallback STT, local
  ``tiny.en``) that also re-transcribes the growing utterance every ``partial_every_s`` while the
  caller speaks and pushes the result as an ``InterimTranscriptionFrame``. No streaming STT model
  is on this machine (the Nemotron ``.nemo`` lives on the GPU box), and pause-then-decide needs
  partials; this stands in for them, slower and coarser than a cache-aware streaming model.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from pipecat.frames.frames import InterimTranscriptionFrame
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transcriptions.language import Language
from pipecat.utils.time import time_now_iso8601

from processors.stt_in_flight import SegmentInFlight
from processors.whisper_stt import CpuThreads


class _ScoredModel:
    """The faster-whisper model, noting every segment it returns with its ``no_speech_prob``
    (before any threshold), so a run can tell how Annie's echo residue scores against the caller."""

    def __init__(self, model, scores: list[tuple[float, str, float]]):
        self._model, self._scores = model, scores

    def transcribe(self, *args, **kwargs):
        segments, info = self._model.transcribe(*args, **kwargs)
        segments = list(segments)
        now = time.monotonic()
        self._scores.extend((now, s.text.strip(), float(s.no_speech_prob)) for s in segments if s.text.strip())
        return iter(segments), info

    def __getattr__(self, name):
        return getattr(self._model, name)


class PartialWhisperSTTService(SegmentInFlight, CpuThreads, WhisperSTTService):
    """Whisper with interim transcripts while the caller speaks (see module doc)."""

    streams_partials = True

    def __init__(self, *, partial_every_s: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        # (time, text, no_speech_prob) of every segment Whisper returned, partials and finals.
        self.scores: list[tuple[float, str, float]] = []
        if self._model is not None:
            self._model = _ScoredModel(self._model, self.scores)
        self._partial_every_bytes = 0
        self._partial_every_s = partial_every_s
        self._next_partial_at = 0
        self._partial_task: asyncio.Task | None = None

    async def _handle_user_started_speaking(self, frame):
        await super()._handle_user_started_speaking(frame)
        self._partial_every_bytes = int(self.sample_rate * self._partial_every_s) * 2
        self._next_partial_at = len(self._audio_buffer) + self._partial_every_bytes

    async def process_audio_frame(self, frame, direction):
        await super().process_audio_frame(frame, direction)
        if not self._user_speaking or len(self._audio_buffer) < self._next_partial_at:
            return
        if self._partial_task is None or self._partial_task.done():
            self._next_partial_at = len(self._audio_buffer) + self._partial_every_bytes
            self._partial_task = self.create_task(self._partial(bytes(self._audio_buffer)), "partial")

    async def _partial(self, pcm: bytes) -> None:
        model = self._model
        if model is None:
            return
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0

        def transcribe() -> list:
            segments, _ = model.transcribe(audio, language="en", beam_size=1, without_timestamps=True)
            return list(segments)

        segments = await asyncio.to_thread(transcribe)
        threshold = self._settings.no_speech_prob
        text = " ".join(s.text.strip() for s in segments if not isinstance(threshold, float) or s.no_speech_prob < threshold)
        if text.strip() and self._user_speaking:
            await self.push_frame(InterimTranscriptionFrame(text.strip(), self._user_id, time_now_iso8601()))


def whisper_stt(partials: bool, model_path: Path | None = None, cpu_threads: int = 0):
    """The agent's Whisper fallback (bundled tiny.en), with or without partial transcripts;
    ``cpu_threads`` as ``WHISPER_CPU_THREADS`` (0: half the cores, 1 to 4)."""
    from processors.whisper_stt import NO_SPEECH_PROB, check_whisper_model_dir, default_whisper_model_path, make_whisper_stt

    if not partials:
        return make_whisper_stt(model_path, cpu_threads=cpu_threads)
    path = check_whisper_model_dir(model_path or default_whisper_model_path())
    settings = WhisperSTTService.Settings(model=str(path), language=Language.EN, no_speech_prob=NO_SPEECH_PROB)
    return PartialWhisperSTTService(device="cpu", compute_type="default", settings=settings, cpu_threads=cpu_threads)

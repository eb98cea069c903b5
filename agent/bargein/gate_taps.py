"""The caller-voice gate in the pipeline: what it hears, when it scores, and whom it tells.

:class:`VoiceJudge` keeps the caller's audio of the current utterance (with ``preroll_s`` from
before the VAD start, which comes late), and:
- while Annie is silent, enrols the caller from each utterance at its VAD stop;
- while Annie speaks (pause first has paused her), scores the sound once it has ``score_s`` of
  audio, or at its VAD stop if shorter.
:class:`AnnieVoice` enrols Annie's voice from her first seconds of speech. With barge-in,
:class:`CallerVoiceTap` (between the STT and the user aggregator) drives the judge from the
pipeline's VAD and tells the start strategy when a sound is clearly not the caller's voice, and
:class:`AnnieVoiceTap` (after the TTS) feeds Annie's audio; in shadow mode the shadow's taps drive
the same two from the shadow's own VAD (:mod:`agent.bargein.shadow`). The embeddings run on one
worker thread (:class:`GateWorker`); every frame goes on first, unchanged. Scores go to the log
at DEBUG (numbers only).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    TTSAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from agent.bargein.gate import CallerGate, Scored, Verdict

RATE = 16000
MAX_UTTERANCE_S = 10.0  # a longer utterance keeps its first ten seconds
KEPT_VERDICTS = 256  # the latest verdicts, with their times, for a bench or a report


class GateWorker:
    """The speaker encoder (``embed(pcm) -> unit vector | None``), the gate, and one thread."""

    def __init__(self, encoder: Any, gate: CallerGate):
        self.encoder = encoder
        self.gate = gate
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caller-gate")

    async def embed(self, pcm: np.ndarray) -> np.ndarray | None:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.encoder.embed, pcm)
        except Exception as e:  # noqa: BLE001 - a broken embedding is "unsure", never a broken call
            logger.warning(f"caller gate: embedding failed ({type(e).__name__}: {e}); unsure")
            return None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class VoiceJudge:
    """Which sounds the gate enrols and which it scores, apart from any pipeline.

    The caller's audio and her voice's start and stop (from whichever VAD the owner has) come in;
    the state changes at once, and the embedding work comes back as a job (a coroutine) that the
    owner awaits in line (barge-in: the verdict is the decision) or runs beside the call (shadow
    mode: the call never waits for it). ``on_verdict`` is given each score.
    """

    def __init__(self, worker: GateWorker, on_verdict: Callable[[Scored], Awaitable[None]], *, score_s: float = 0.6,
                 preroll_s: float = 0.3):
        self._worker = worker
        self._on_verdict = on_verdict
        self._score_s = score_s
        self._preroll: deque[bytes] = deque(maxlen=max(1, round(preroll_s / 0.02)))
        self._utterance: bytearray | None = None
        self._deciding = False  # the utterance began while Annie spoke
        self._scored = False
        self.bot_speaking = False
        self.verdicts: deque[Scored] = deque(maxlen=KEPT_VERDICTS)
        self.verdict_times: deque[float] = deque(maxlen=KEPT_VERDICTS)  # time.monotonic() of each

    @property
    def gate(self) -> CallerGate:
        return self._worker.gate

    def voice_started(self) -> None:
        self._utterance = bytearray(b"".join(self._preroll))  # the VAD's start comes late
        self._deciding, self._scored = self.bot_speaking, False

    def audio(self, pcm: bytes) -> Coroutine[Any, Any, None] | None:
        self._preroll.append(pcm)
        if self._utterance is None or len(self._utterance) >= MAX_UTTERANCE_S * RATE * 2:
            return None
        self._utterance += pcm
        if self._deciding and not self._scored and len(self._utterance) >= self._score_s * RATE * 2:
            return self._score(bytes(self._utterance))
        return None

    def voice_stopped(self) -> Coroutine[Any, Any, None] | None:
        utterance, self._utterance = self._utterance, None
        if utterance is None:
            return None
        if self._deciding:
            return None if self._scored else self._score(bytes(utterance))  # score what there is
        if not self.bot_speaking:
            # Annie silent throughout: the caller's own voice (enrolment, refined every turn).
            return self._enroll(np.frombuffer(bytes(utterance), dtype=np.int16))
        return None

    def _score(self, utterance: bytes) -> Coroutine[Any, Any, None]:
        self._scored = True
        return self._scoring(np.frombuffer(utterance, dtype=np.int16))

    async def _scoring(self, pcm: np.ndarray) -> None:
        scored = self._worker.gate.verdict(await self._worker.embed(pcm))
        self.verdicts.append(scored)
        self.verdict_times.append(time.monotonic())
        logger.debug(f"caller gate: {scored.verdict.value} (caller {scored.caller}, Annie {scored.annie}, "
                     f"{len(pcm) / RATE:.2f} s)")
        await self._on_verdict(scored)

    async def _enroll(self, pcm: np.ndarray) -> None:
        self._worker.gate.enroll_caller(await self._worker.embed(pcm), len(pcm) / RATE)


class AnnieVoice:
    """Enrols Annie's voice from her first ``enroll_s`` of speech (TTS audio at any rate)."""

    def __init__(self, worker: GateWorker, enroll_s: float = 4.0):
        self._worker = worker
        self._enroll_s = enroll_s
        self._audio: list[np.ndarray] = []
        self._seconds = 0.0
        self.done = False

    def heard(self, audio: bytes, sample_rate: int) -> Coroutine[Any, Any, None] | None:
        """Her audio; the enrolment job once there is enough of it."""
        if self.done:
            return None
        pcm = np.frombuffer(audio, dtype=np.int16)
        if sample_rate != RATE:
            pcm = soxr.resample(pcm, sample_rate, RATE).astype(np.int16)
        self._audio.append(pcm)
        self._seconds += len(pcm) / RATE
        if self._seconds < self._enroll_s:
            return None
        self.done = True
        voice, self._audio = np.concatenate(self._audio), []
        return self._enroll(voice)

    async def _enroll(self, voice: np.ndarray) -> None:
        self._worker.gate.enroll_annie(await self._worker.embed(voice), len(voice) / RATE)


class CallerVoiceTap(FrameProcessor):
    """Barge-in: the judge on the pipeline's VAD; a verdict of "not the caller" goes to the start
    strategy at once (see module doc)."""

    def __init__(self, worker: GateWorker, strategy: Any, *, score_s: float = 0.6, preroll_s: float = 0.3):
        super().__init__()
        self._worker = worker
        self._strategy = strategy  # has ``async gate_verdict(not_caller: bool)``
        self.judge = VoiceJudge(worker, self._verdict, score_s=score_s, preroll_s=preroll_s)

    @property
    def gate(self) -> CallerGate:
        return self._worker.gate

    @property
    def verdicts(self) -> deque[Scored]:
        return self.judge.verdicts

    @property
    def verdict_times(self) -> deque[float]:
        return self.judge.verdict_times

    async def _verdict(self, scored: Scored) -> None:
        if scored.verdict is Verdict.NOT_CALLER:
            await self._strategy.gate_verdict(not_caller=True)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        job = None
        if isinstance(frame, InputAudioRawFrame) and frame.sample_rate == RATE:
            job = self.judge.audio(frame.audio)
        elif isinstance(frame, BotStartedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            self.judge.bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            self.judge.bot_speaking = False
        elif isinstance(frame, VADUserStartedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            self.judge.voice_started()
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            job = self.judge.voice_stopped()
        if job is not None:
            await job

    async def cleanup(self):
        self._worker.close()
        await super().cleanup()


class AnnieVoiceTap(FrameProcessor):
    """After the TTS: enrols Annie's voice from her first ``enroll_s`` of speech."""

    def __init__(self, worker: GateWorker, enroll_s: float = 4.0):
        super().__init__()
        self._annie = AnnieVoice(worker, enroll_s)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            job = self._annie.heard(frame.audio, frame.sample_rate)
            if job is not None:
                await job

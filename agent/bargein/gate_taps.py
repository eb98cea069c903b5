"""The caller-voice gate in the pipeline: what it hears, when it scores, and whom it tells.

:class:`CallerVoiceTap` sits between the STT and the user aggregator. It keeps the caller's audio
of the current utterance (with ``preroll_s`` from before the VAD start, which comes late), and:
- while Annie is silent, enrols the caller from each utterance at its VAD stop;
- while Annie speaks (pause first has paused her), scores the sound once it has ``score_s`` of
  audio, or at its VAD stop if shorter, and tells the start strategy when it is clearly not the
  caller's voice.
:class:`AnnieVoiceTap`, after the TTS, enrols Annie's voice from her first seconds of speech.
The embeddings run on one worker thread (:class:`GateWorker`); every frame goes on first,
unchanged. Scores go to the log at DEBUG (numbers only).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
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


class CallerVoiceTap(FrameProcessor):
    """Enrols the caller, scores the sound that paused Annie (see module doc)."""

    def __init__(self, worker: GateWorker, strategy: Any, *, score_s: float = 0.6, preroll_s: float = 0.3):
        super().__init__()
        self._worker = worker
        self._strategy = strategy  # has ``async gate_verdict(not_caller: bool)``
        self._score_s = score_s
        self._preroll: deque[bytes] = deque(maxlen=max(1, round(preroll_s / 0.02)))
        self._utterance: bytearray | None = None
        self._deciding = False  # the utterance began while Annie spoke
        self._scored = False
        self._bot_speaking = False
        self.verdicts: deque[Scored] = deque(maxlen=KEPT_VERDICTS)
        self.verdict_times: deque[float] = deque(maxlen=KEPT_VERDICTS)  # time.monotonic() of each

    @property
    def gate(self) -> CallerGate:
        return self._worker.gate

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and frame.sample_rate == RATE:
            await self._audio(frame.audio)
        elif isinstance(frame, BotStartedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            self._bot_speaking = False
        elif isinstance(frame, VADUserStartedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            self._utterance = bytearray(b"".join(self._preroll))
            self._deciding, self._scored = self._bot_speaking, False
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and direction == FrameDirection.UPSTREAM:
            await self._utterance_over()

    async def _audio(self, pcm: bytes) -> None:
        self._preroll.append(pcm)
        if self._utterance is None or len(self._utterance) >= MAX_UTTERANCE_S * RATE * 2:
            return
        self._utterance += pcm
        if self._deciding and not self._scored and len(self._utterance) >= self._score_s * RATE * 2:
            await self._score()

    async def _utterance_over(self) -> None:
        utterance, self._utterance = self._utterance, None
        if utterance is None:
            return
        pcm = np.frombuffer(bytes(utterance), dtype=np.int16)
        if self._deciding:
            if not self._scored:
                self._utterance = utterance  # score what there is
                await self._score()
                self._utterance = None
        elif not self._bot_speaking:
            # Annie silent throughout: the caller's own voice (enrolment, refined every turn).
            self._worker.gate.enroll_caller(await self._worker.embed(pcm), len(pcm) / RATE)

    async def _score(self) -> None:
        self._scored = True
        pcm = np.frombuffer(bytes(self._utterance or b""), dtype=np.int16)
        scored = self._worker.gate.verdict(await self._worker.embed(pcm))
        self.verdicts.append(scored)
        self.verdict_times.append(time.monotonic())
        logger.debug(f"caller gate: {scored.verdict.value} (caller {scored.caller}, Annie {scored.annie}, "
                     f"{len(pcm) / RATE:.2f} s)")
        if scored.verdict is Verdict.NOT_CALLER:
            await self._strategy.gate_verdict(not_caller=True)

    async def cleanup(self):
        self._worker.close()
        await super().cleanup()


class AnnieVoiceTap(FrameProcessor):
    """After the TTS: enrols Annie's voice from her first ``enroll_s`` of speech."""

    def __init__(self, worker: GateWorker, enroll_s: float = 4.0):
        super().__init__()
        self._worker = worker
        self._enroll_s = enroll_s
        self._audio: list[np.ndarray] = []
        self._seconds = 0.0
        self._done = False

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if self._done or not isinstance(frame, TTSAudioRawFrame):
            return
        pcm = np.frombuffer(frame.audio, dtype=np.int16)
        if frame.sample_rate != RATE:
            pcm = soxr.resample(pcm, frame.sample_rate, RATE).astype(np.int16)
        self._audio.append(pcm)
        self._seconds += len(pcm) / RATE
        if self._seconds >= self._enroll_s:
            self._done = True
            voice = np.concatenate(self._audio)
            self._audio = []
            self._worker.gate.enroll_annie(await self._worker.embed(voice), len(voice) / RATE)

"""Pipecat STT service on top of :class:`processors.nemotron.engine.NemotronStreamingEngine`.

Audio frames are only queued in ``run_stt``; one worker thread runs every model step, so the
event loop (and barge-in detection) never waits for the GPU. While the caller speaks (between the
VAD's start and stop frames) each chunk is stepped and an ``InterimTranscriptionFrame`` goes out
whenever the running hypothesis changes; the VAD stop finalizes the stream and pushes exactly one
``TranscriptionFrame(finalized=True)``, which lets Pipecat's turn stop strategies end the turn at
once. Audio outside speech only fills a short pre-roll, so noise between turns cannot leak into
the next transcript. While the user is muted (half-duplex: the bot is speaking) nothing is heard,
and the stream starts afresh when the mute ends.

Place a ``VADProcessor`` before this service: the turn's final transcript is produced on the
``VADUserStoppedSpeakingFrame``. (Finalizing on ``UserStoppedSpeakingFrame`` instead would
deadlock: the aggregator emits that frame only after a transcript has arrived.)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncGenerator, Callable

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterimTranscriptionFrame,
    StartFrame,
    TranscriptionFrame,
    UserMuteStartedFrame,
    UserMuteStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import STTService
from pipecat.transcriptions.language import Language
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.time import time_now_iso8601

from processors.nemotron.engine import NemotronStreamingEngine, StreamState
from processors.stt_in_flight import mark_segment

MODEL_NAME = "nemotron-speech-streaming-en-0.6b"
_LAG_WARNING_INTERVAL_S = 10.0


class NemotronStreamingSTTService(STTService):
    """In-process cache-aware streaming ASR with partial and final transcripts."""

    # The pipeline asks this (pause-then-decide barge-in needs partial transcripts).
    streams_partials = True

    def __init__(
        self,
        *,
        engine: NemotronStreamingEngine,
        vad_gated: bool = True,
        preroll_ms: int = 500,
        lag_warning_s: float | None = None,
        ttfs_p99_latency: float = 0.5,
        **kwargs: Any,
    ):
        """Create the service.

        Args:
            engine: the loaded engine (shared engines are fine; each service has its own stream).
            vad_gated: step the model only between VAD start and stop (with ``preroll_ms`` of
                audio from before the start). False streams all audio; the VAD stop still
                finalizes.
            preroll_ms: audio kept from before the VAD start; the VAD reports speech only after
                its start time (0.2 s by default), so this must be longer.
            lag_warning_s: warn when this much audio waits for the model (default: two chunks,
                at least 0.5 s).
            ttfs_p99_latency: speech end to final transcript (VAD stop time plus finalize).
            **kwargs: passed to ``STTService``.
        """
        super().__init__(
            ttfs_p99_latency=ttfs_p99_latency,
            settings=STTSettings(model=MODEL_NAME, language=Language.EN),
            **kwargs,
        )
        self._engine = engine
        self._vad_gated = vad_gated
        self._preroll_ms = preroll_ms
        self._lag_warning_s = lag_warning_s or max(0.5, 2 * engine.chunk_ms / 1000)
        self._stream: StreamState | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._worker_task: asyncio.Task | None = None
        self._jobs: deque[tuple[str, Any]] = deque()
        self._jobs_ready = asyncio.Event()
        self._preroll: deque[bytes] = deque()
        self._preroll_bytes = 0
        self._speaking = False
        self._user_muted = False
        self._queued_s = 0.0  # audio handed to the worker but not yet stepped
        self.segments_ended = 0  # VAD stops handed to the worker (each final is marked with its number)
        self._last_lag_warning = 0.0
        self._drain_timeout_s = 5.0
        self._turn_lost = False  # a step failed: skip audio until the next turn starts
        self._working = False  # the worker is running a job
        self._working_on = ""  # ... of this kind

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def engine(self) -> NemotronStreamingEngine:
        """The engine behind the service (shared: another stream may run on it, e.g. the shadow's)."""
        return self._engine

    @property
    def audio_in_flight(self) -> bool:
        """Audio or a final is queued for the model or being stepped (see ``processors.stt_in_flight``)."""
        return self._working or bool(self._jobs)

    @property
    def words_in_flight(self) -> bool:
        """A turn's final is queued or being made: words she said are still to come. (Unlike
        ``audio_in_flight``, not the steps over the quiet that follow it.)"""
        return (self._working and self._working_on == "final") or any(kind == "final" for kind, _ in self._jobs)

    # ----- lifecycle ------------------------------------------------------------------------

    async def start(self, frame: StartFrame):
        await super().start(frame)
        if self._worker_task:
            return
        self._stream = self._engine.new_stream(sample_rate=self.sample_rate)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nemotron-stt")
        self._worker_task = self.create_task(self._work(), name="nemotron_stt_worker")

    async def stop(self, frame: EndFrame):
        """Graceful end: finish queued work (a pending final transcript) before stopping."""
        await self._drain()
        await super().stop(frame)
        await self._shutdown()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._shutdown()

    async def cleanup(self):
        await super().cleanup()
        await self._shutdown()

    async def _drain(self) -> None:
        if not self._worker_task:
            return
        done = asyncio.get_running_loop().create_future()
        self._enqueue("flush", done)
        try:
            await asyncio.wait_for(done, timeout=self._drain_timeout_s)
        except asyncio.TimeoutError:
            logger.warning(f"{self}: queued ASR work did not finish within {self._drain_timeout_s} s; dropping it")

    async def _shutdown(self) -> None:
        """Stop the worker; safe to call more than once."""
        if self._worker_task:
            await self.cancel_task(self._worker_task)
            self._worker_task = None
        if self._executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._jobs.clear()

    # ----- frames in ------------------------------------------------------------------------

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Queue the audio for the worker (never blocks)."""
        if self._user_muted:
            pass
        elif self._vad_gated and not self._speaking:
            self._keep_preroll(audio)
        else:
            self._queued_s += len(audio) / (2 * self.sample_rate)
            self._enqueue("audio", audio)
        yield None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            if not self._user_muted and not self._speaking:
                self._speaking = True
                if self._vad_gated:
                    preroll = b"".join(self._preroll)
                    self._queued_s += len(preroll) / (2 * self.sample_rate)
                    self._clear_preroll()
                    self._enqueue("begin", preroll)
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            if (self._speaking or not self._vad_gated) and not self._user_muted:
                self.segments_ended += 1
                self._enqueue("final", self.segments_ended)
            self._speaking = False
            self._clear_preroll()
        elif isinstance(frame, UserMuteStartedFrame):
            self._set_muted(True)
        elif isinstance(frame, UserMuteStoppedFrame):
            self._set_muted(False)

    def _set_muted(self, muted: bool) -> None:
        """Half-duplex: drop everything heard while muted, start afresh when the mute ends."""
        if muted == self._user_muted:
            return
        logger.debug(f"{self}: user {'muted' if muted else 'unmuted'}, resetting the stream")
        self._user_muted = muted
        self._speaking = False
        self._clear_preroll()
        self._jobs = deque(job for job in self._jobs if job[0] in ("final", "flush"))  # drop the audio
        self._queued_s = 0.0
        self._enqueue("reset", None)

    def _keep_preroll(self, audio: bytes) -> None:
        self._preroll.append(audio)
        self._preroll_bytes += len(audio)
        limit = 2 * self.sample_rate * self._preroll_ms // 1000
        while self._preroll and self._preroll_bytes - len(self._preroll[0]) >= limit:
            self._preroll_bytes -= len(self._preroll.popleft())

    def _clear_preroll(self) -> None:
        self._preroll.clear()
        self._preroll_bytes = 0

    def _enqueue(self, kind: str, payload: Any) -> None:
        self._jobs.append((kind, payload))
        self._jobs_ready.set()

    # ----- the worker -----------------------------------------------------------------------

    async def _work(self) -> None:
        """Run queued jobs in order; consecutive audio jobs are stepped as one."""
        while True:
            await self._jobs_ready.wait()
            self._jobs_ready.clear()
            while self._jobs:
                kind, payload = self._jobs.popleft()
                if kind == "audio":
                    while self._jobs and self._jobs[0][0] == "audio":
                        payload += self._jobs.popleft()[1]
                self._working, self._working_on = True, kind
                try:
                    await self._run_job(kind, payload)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a failed step loses this turn, not the call
                    await self._lose_turn(e)
                finally:
                    self._working = False

    async def _run_job(self, kind: str, payload: Any) -> None:
        engine, stream = self._engine, self._stream
        if kind == "flush":
            if not payload.done():
                payload.set_result(None)
        elif kind == "reset":
            self._turn_lost = False
            await self._in_worker(stream.reset)
        elif kind == "begin":
            self._turn_lost = False
            await self._in_worker(stream.reset)
            await self._step_audio(payload)
        elif kind == "audio":
            await self._step_audio(payload)
        elif kind == "final" and self._turn_lost:  # the rest of a failed turn is not transcribed
            self._turn_lost = False
            await self._in_worker(stream.reset)
        elif kind == "final":
            started = time.perf_counter()
            text = await self._in_worker(engine.finalize, stream)
            self._working_on = "final made"  # its words are no longer in flight once pushed
            logger.debug(f"{self}: finalized in {1e3 * (time.perf_counter() - started):.0f} ms")
            if text.strip():
                logger.trace(f"{self}: final transcript: {text!r}")
                frame = TranscriptionFrame(text, self._user_id, time_now_iso8601(), finalized=True)
                await self.push_frame(mark_segment(frame, payload))

    async def _step_audio(self, audio: bytes) -> None:
        seconds = len(audio) / (2 * self.sample_rate)
        if self._turn_lost:
            self._queued_s = max(0.0, self._queued_s - seconds)
            return
        self._warn_if_behind()
        try:
            text = await self._in_worker(self._engine.accept, self._stream, audio)
        finally:
            self._queued_s = max(0.0, self._queued_s - seconds)
        if text is not None and text.strip():
            logger.trace(f"{self}: partial transcript: {text!r}")
            await self.push_frame(InterimTranscriptionFrame(text, self._user_id, time_now_iso8601()))

    def _warn_if_behind(self) -> None:
        now = time.monotonic()
        if self._queued_s > self._lag_warning_s and now - self._last_lag_warning > _LAG_WARNING_INTERVAL_S:
            self._last_lag_warning = now
            logger.warning(
                f"{self}: ASR steps are falling behind real time: {self._queued_s:.2f} s of audio "
                f"waiting ({self._engine}); use a GPU or a longer ASR_CHUNK_MS"
            )

    async def _lose_turn(self, error: Exception) -> None:
        self._turn_lost = True
        logger.error(f"{self}: ASR step failed, this turn is lost: {type(error).__name__}: {error}")
        try:
            await self._in_worker(self._stream.reset)
            _release_cuda_memory(error)
        except Exception as reset_error:  # the stream object itself is broken: replace it
            logger.error(f"{self}: stream reset failed ({reset_error}); starting a new stream")
            self._stream = self._engine.new_stream(sample_rate=self.sample_rate)
        await self.push_error(f"{self}: speech recognition failed for this turn: {error}", exception=error, category=ErrorCategory.SERVER)

    async def _in_worker(self, fn: Callable, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)


def _release_cuda_memory(error: Exception) -> None:
    """After a CUDA out-of-memory error, hand cached blocks back so the next turn can run."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()

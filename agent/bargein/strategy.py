"""The pipecat side of pause-then-decide: a user-turn start strategy around :class:`BargeInCore`.

It turns frames into the core's events (with the time from an injectable clock), carries out
the core's actions on the playback and the user aggregator, and keeps one timer for the core's
"wake me at t". Every rule is in :mod:`agent.bargein.core`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start import BaseUserTurnStartStrategy, TranscriptionUserTurnStartStrategy

from agent.bargein.core import (
    AnsweredTurnTail,
    BargeInCore,
    BargeInParams,
    Commit,
    Flow,
    Outcome,
    Pause,
    ResetAggregation,
    Resume,
    StartTurn,
    WakeAt,
)
from agent.bargein.recording import EventLog, params_record
from processors.stt_in_flight import segment_of
from transports.playback import PausablePlayback


def tune_vad_for_pause_first(
    vad: VADAnalyzer, *, start_ms: int, min_volume: float, sample_rate: int, confidence: float | None = None
) -> VADParams:
    """Let the VAD hear the caller sooner, for a call that pauses first and decides.

    A false start under pause-then-decide costs a short pause that resumes, not a lost reply, so
    the start can be short (``start_ms``), and pipecat's loudness gate (``min_volume``, measured
    over a 400 ms window and smoothed, which holds back every onset by ~230 ms after silence)
    can be lowered, and so can the confidence (``None`` keeps it): under double talk the echo
    canceller takes ~8 dB off the caller's first 300 ms, and Silero's score rises late. The stop
    time is kept. Returns the parameters now in force.
    """
    update = {"start_secs": start_ms / 1000, "min_volume": min_volume}
    if confidence is not None:
        update["confidence"] = confidence
    params = vad.params.model_copy(update=update)
    # set_params needs the rate; the pipeline sets it again at start and keeps these parameters.
    vad.set_sample_rate(sample_rate)
    vad.set_params(params)
    logger.info(f"barge-in: VAD start {start_ms} ms, min volume {min_volume}, confidence {params.confidence} (pause first)")
    return params


class PauseThenDecideStartStrategy(BaseUserTurnStartStrategy):
    """Start the caller's turn; while Annie speaks, pause her first and decide (see the core)."""

    def __init__(
        self,
        *,
        playback: PausablePlayback,
        params: BargeInParams | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: EventLog | None = None,
        stt_in_flight: Callable[[], bool] = lambda: False,
        stt_segments: Callable[[], int | None] = lambda: None,
    ):
        """``stt_in_flight``: whether the STT still has the caller's audio to transcribe (asked when
        Annie starts; see :class:`~agent.bargein.core.AnsweredTurnTail`); ``stt_segments``: how
        many segments the STT has been handed (asked at each pause: a final marked with one of
        those is an earlier utterance's, see :mod:`processors.stt_in_flight`)."""
        super().__init__(enable_interruptions=True)
        self._playback = playback
        self._stt_in_flight = stt_in_flight
        self._stt_segments = stt_segments
        self._segments_at_pause: int | None = None
        self._clock = clock
        self._log = log
        self.core = BargeInCore(params)
        if log is not None:
            log.records.append(params_record(self.core.params, clock()))
        self._timer: asyncio.Task | None = None
        self._timer_for: float | None = None
        self._committing = False
        # The caller's current turn began as an interruption committed here (so Annie was cut off
        # and owes the caller an answer, even if no words come).
        self.turn_interrupted_annie = False

    @property
    def decisions(self) -> list[tuple[str, float]]:
        return self.core.decisions

    async def handle_user_turn_started(self):
        self._event("turn_started")
        self.core.turn_started(self._clock())
        self._sync_timer()
        self.turn_interrupted_annie, self._committing = self._committing, False

    async def cleanup(self):
        self._cancel_timer()
        await super().cleanup()

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        now = self._clock()
        core = self.core
        if isinstance(frame, BotStartedSpeakingFrame):
            in_flight = self._stt_in_flight()
            self._event("bot_started", now, **({"in_flight": True} if in_flight else {}))
            out = core.bot_started(now, caller_audio_in_flight=in_flight)
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._event("bot_stopped", now)
            out = core.bot_stopped(now)
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._event("voice_started", now)
            out = core.voice_started(now)
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._event("voice_stopped", now)
            out = core.voice_stopped(now)
        elif isinstance(frame, (InterimTranscriptionFrame, TranscriptionFrame)):
            final = not isinstance(frame, InterimTranscriptionFrame)
            echo = self._playback.recent_bot_words()
            segment, before = segment_of(frame), self._segments_at_pause
            earlier = final and segment is not None and before is not None and segment <= before
            self._event("words", now, text=frame.text, final=final, echo=sorted(echo), **({"earlier": True} if earlier else {}))
            out = core.words(now, frame.text, final=final, annies_words=echo, earlier=earlier)
        else:
            return ProcessFrameResult.CONTINUE
        if self._log is not None and self._log.records[-1].get("e"):
            self._log.records[-1]["result"] = out.flow.value
        await self._carry_out(out)
        return ProcessFrameResult.STOP if out.flow is Flow.STOP else ProcessFrameResult.CONTINUE

    async def gate_verdict(self, not_caller: bool) -> None:
        """The caller-voice gate's verdict on the sound that paused Annie (``agent.bargein.gate_taps``)."""
        now = self._clock()
        self._event("verdict", now, not_caller=not_caller)
        await self._carry_out(self.core.voice_verdict(now, not_caller))

    async def _carry_out(self, out: Outcome) -> None:
        for action in out.actions:
            if self._log is not None and not isinstance(action, WakeAt):
                self._log.action(action, self._clock())
            if isinstance(action, Pause):
                self._segments_at_pause = self._stt_segments()
                await self._playback.pause_playback()
                logger.debug(f"{self}: caller voice while Annie speaks: playback paused, deciding")
                now = self._clock()
                self._event("paused", now)
                await self._carry_out(self.core.playback_paused(now))
            elif isinstance(action, Resume):
                logger.debug(f"{self}: no real words: resuming Annie")
                await self._playback.resume_playback(action.backup_ms)
            elif isinstance(action, ResetAggregation):
                await self.trigger_reset_aggregation()
            elif isinstance(action, StartTurn):
                await self.trigger_user_turn_started()
            elif isinstance(action, Commit):
                logger.debug(f"{self}: interruption committed ({action.why})")
                self._cancel_timer()
                self._committing = True
                try:
                    await self.trigger_user_turn_started()
                finally:
                    self._committing = False
        self._sync_timer()

    def _sync_timer(self) -> None:
        """One timer, for the time the core last asked for (a new one: a sleeping task would not
        see an earlier time)."""
        wake_at = self.core.wake_at
        if wake_at is None:
            self._cancel_timer()
        elif wake_at != self._timer_for or self._timer is None:
            self._cancel_timer()
            self._timer_for = wake_at
            self._timer = self.task_manager.create_task(self._wake(wake_at), f"{self}::decide")

    async def _wake(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self._clock()))
        if self._timer is asyncio.current_task():
            self._timer, self._timer_for = None, None
        now = self._clock()
        self._event("tick", now)
        await self._carry_out(self.core.tick(now))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        self._timer, self._timer_for = None, None

    def _event(self, name: str, now: float | None = None, **data) -> None:
        if self._log is not None:
            self._log.event(name, self._clock() if now is None else now, **data)


class TranscriptTurnStartStrategy(TranscriptionUserTurnStartStrategy):
    """Pipecat's transcript start strategy (a transcript starts the caller's turn, interrupting
    Annie), less the late tail of the turn she is answering (:class:`AnsweredTurnTail`): that is
    dropped, not an interruption. For barge-in without pause first (an STT with no partials)."""

    def __init__(self, *, stt_in_flight: Callable[[], bool], **kwargs):
        super().__init__(enable_interruptions=True, **kwargs)
        self._stt_in_flight = stt_in_flight
        self._tail = AnsweredTurnTail()
        self._bot_speaking = False
        self._caller_speaking = False
        self._stopped_since_start = True

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
            self._tail.bot_started(self._stt_in_flight(), self._caller_speaking)
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            self._tail.bot_stopped()
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._caller_speaking, self._stopped_since_start = True, False
            self._tail.voice_started()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._caller_speaking, self._stopped_since_start = False, True
        elif isinstance(frame, (InterimTranscriptionFrame, TranscriptionFrame)) and self._bot_speaking:
            final = isinstance(frame, TranscriptionFrame)
            if self._tail.is_tail(final=final, utterance_stopped=self._stopped_since_start):
                logger.debug(f"{self}: a late transcript of the turn Annie is answering: not an interruption")
                await self.trigger_reset_aggregation()
                return ProcessFrameResult.STOP
        return await super().process_frame(frame)

"""Turn-taking policy: barge-in on or off, mapped onto Pipecat 1.x turn and mute strategies.

Pipecat 1.x has no ``allow_interruptions`` switch any more. Barge-in is a property of the user
aggregator: user-turn *start* strategies with ``enable_interruptions=True`` interrupt the bot,
and user *mute* strategies drop the caller's audio, VAD and transcripts while they hold.

- Barge-in on: a VAD or transcription start of the caller's turn interrupts Annie: pipecat
  broadcasts ``InterruptionFrame``, which cancels the LLM stream and TTS request and drops
  queued audio.
- Barge-in off (half-duplex): :class:`HalfDuplexMuteStrategy` mutes the caller from Annie's
  first audio until a short hold-off after her last, so the playback tail still in the sound
  server does not open a turn. The STT resets its stream on ``UserMuteStoppedFrame``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loguru import logger
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer
from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    UserMuteStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_mute import BaseUserMuteStrategy
from pipecat.turns.user_start import (
    BaseUserTurnStartStrategy,
    VADUserTurnStartStrategy,
)
from pipecat.turns.user_stop import (
    BaseUserTurnStopStrategy,
    SpeechTimeoutUserTurnStopStrategy,
    TurnAnalyzerUserTurnStopStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from agent.bargein.strategy import TranscriptTurnStartStrategy
from agent.preempt import PreemptiveSpeechTimeoutStopStrategy, PreemptiveTurnAnalyzerStopStrategy
from agent.turn_hold import AdaptiveHoldStopStrategy, HoldRule, PreemptiveAdaptiveHoldStopStrategy

if TYPE_CHECKING:
    from processors.eou import EndOfTurnModel

INTERRUPTED_MARK = " [cut off here: the caller interrupted, so they did not hear the rest]"


class LateTranscripts:
    """Whether a final transcript is the late one of a turn the watchdog already closed empty.

    An STT slower than real time can deliver a turn's words after the watchdog gave up on it
    (and Annie asked the caller to repeat). Such a transcript is still the caller's question: it
    is answered as a turn of its own if it comes within ``bound_s`` of the empty close and the
    caller has not spoken since. The rule is pure; the clock is passed in.
    """

    def __init__(self, bound_s: float):
        self.bound_s = bound_s
        self._closed_empty_at: float | None = None

    def turn_closed_empty(self, now: float) -> None:
        self._closed_empty_at = now

    def caller_spoke(self) -> None:
        self._closed_empty_at = None

    def answerable(self, now: float) -> bool:
        return self._closed_empty_at is not None and now - self._closed_empty_at <= self.bound_s

    def taken(self) -> None:
        """The late transcript was let through: the next one is not late any more."""
        self._closed_empty_at = None


class HalfDuplexMuteStrategy(BaseUserMuteStrategy):
    """Mute the caller while Annie speaks and for ``holdoff_s`` after she stops.

    Mute strategies are evaluated on every frame reaching the user aggregator, and audio frames
    arrive every 10-20 ms, so the hold-off ends within one frame of its deadline. (The state a
    frame sets applies from the next frame on: pipecat decides a frame's fate before asking.)
    ``late``: the caller's voice heard while unmuted ends the wait for a late transcript.
    """

    def __init__(self, holdoff_s: float = 0.3, late: LateTranscripts | None = None):
        super().__init__()
        self._holdoff_s = holdoff_s
        self._late = late
        self._bot_speaking = False
        self._muted_until = 0.0

    async def process_frame(self, frame: Frame) -> bool:
        await super().process_frame(frame)
        now = time.monotonic()
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            self._muted_until = now + self._holdoff_s
        muted = self.muted
        if isinstance(frame, VADUserStartedSpeakingFrame) and not muted and self._late is not None:
            self._late.caller_spoke()
        return muted

    @property
    def muted(self) -> bool:
        return self._bot_speaking or time.monotonic() < self._muted_until


class LateTranscriptHold(FrameProcessor):
    """Half-duplex: keeps the late transcript of a turn closed empty (see :class:`LateTranscripts`)
    from being muted away, between the STT and the user aggregator.

    Annie may already be asking the caller to repeat when the words come; half-duplex never cuts
    her, and the user aggregator drops what arrives while the caller is muted. So the transcript
    waits here until the mute ends (she finished), and then opens the caller's turn and is
    answered. A request to repeat that had not started playing is withdrawn by that turn's start
    as usual (a transcript that comes before Annie speaks is not muted).
    """

    def __init__(self, late: LateTranscripts, mute: HalfDuplexMuteStrategy):
        super().__init__()
        self._late = late
        self._mute = mute
        self._held: TranscriptionFrame | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame) and self._mute.muted and self._late.answerable(time.monotonic()):
            self._late.taken()
            self._held = frame
            logger.info("a transcript came after its turn was closed empty: answering it when Annie is done")
            return
        if isinstance(frame, TranscriptionFrame) and self._mute.muted:
            # The user aggregator drops it (half-duplex: the caller is not heard while Annie speaks).
            logger.info(f"a transcript of {len(frame.text.split())} words came while the caller is muted "
                        "(half-duplex, Annie speaking): not answered")
        await self.push_frame(frame, direction)
        if isinstance(frame, UserMuteStoppedFrame) and self._held is not None:
            held, self._held = self._held, None
            await self.push_frame(held, FrameDirection.DOWNSTREAM)


@dataclass
class EmptyTurnTimeout:
    """When to close a caller turn that no transcript has ended (the rule; pure, clock passed in).

    The turn closes after ``quiet_s`` with neither the caller's voice nor a transcript, unless
    the STT still has the turn's audio in flight: then it waits up to ``stt_wait_s`` longer for
    the transcript (an STT slower than real time must not be raced by the watchdog). The STT
    ceasing to be busy counts as activity: its transcript is then on its way through the pipeline
    (a CI run closed the turn in that hand-off and asked the caller to repeat a question it heard).
    """

    quiet_s: float
    stt_wait_s: float
    last_activity: float = 0.0
    stt_done: float = 0.0  # when a poll first found the STT no longer busy
    _stt_was_busy: bool = False

    def activity(self, now: float) -> None:
        self.last_activity = now

    def quiet_for(self, now: float) -> float:
        """Seconds with neither the caller's voice nor a transcript."""
        return now - self.last_activity

    def due(self, now: float, *, caller_speaking: bool, stt_busy: bool) -> bool:
        """Asked at each poll, with what the STT says then (the rule notes when it stops being busy)."""
        if stt_busy:
            self._stt_was_busy = True
            return not caller_speaking and self.quiet_for(now) >= self.quiet_s + self.stt_wait_s
        if self._stt_was_busy:
            self._stt_was_busy, self.stt_done = False, now
        if caller_speaking:
            return False
        return now - max(self.last_activity, self.stt_done) >= self.quiet_s


class EmptyTurnWatchdog(BaseUserTurnStopStrategy):
    """Closes a caller turn that no transcript ended, by :class:`EmptyTurnTimeout`, asking the
    STT (``stt_busy``) whether it still works on the turn's audio. Pipecat's own watchdog stays
    as a backstop, set beyond this one's longest wait."""

    def __init__(self, rule: EmptyTurnTimeout, stt_busy: Callable[[], bool], *, poll_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._rule = rule
        self._stt_busy = stt_busy
        self._poll_s = poll_s
        self._clock = clock
        self._caller_speaking = False
        self._task: asyncio.Task | None = None

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._caller_speaking = True
            self._rule.activity(self._clock())
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._caller_speaking = False
            self._rule.activity(self._clock())
        elif isinstance(frame, (TranscriptionFrame, InterimTranscriptionFrame)):
            self._rule.activity(self._clock())
        return ProcessFrameResult.CONTINUE

    async def handle_user_turn_started(self):
        self._rule.activity(self._clock())
        self._cancel()
        self._task = self.task_manager.create_task(self._watch(), f"{self}::watch")

    async def handle_user_turn_stopped(self):
        self._cancel()

    async def cleanup(self):
        self._cancel()
        await super().cleanup()

    async def _watch(self) -> None:
        waited = False
        while True:
            await asyncio.sleep(self._poll_s)
            now, busy = self._clock(), self._stt_busy()
            if self._rule.due(now, caller_speaking=self._caller_speaking, stt_busy=busy):
                break
            if busy and not waited and not self._caller_speaking and self._rule.quiet_for(now) >= self._rule.quiet_s:
                waited = True
                logger.info("caller turn quiet, but the STT is still transcribing it: waiting for its words")
        logger.debug(f"{self}: no transcript ended the caller's turn; closing it")
        self._task = None
        await self.trigger_user_turn_stopped()

    def _cancel(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._task = None


class TurnSpeechMeter(BaseUserTurnStartStrategy):
    """How long the caller's voice lasted in each turn (VAD start to stop); never starts a turn.

    It must come first among the start strategies: a strategy that starts a turn stops the
    others from seeing that frame. ``last_turn_speech_s`` holds the turn that ended last, set
    before the user aggregator announces the turn's end.
    """

    def __init__(self):
        super().__init__(enable_interruptions=False)
        self._speaking_since: float | None = None
        self._speech_s = 0.0
        self.last_turn_speech_s = 0.0

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStartedSpeakingFrame) and self._speaking_since is None:
            self._speaking_since = time.monotonic()
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self._speaking_since is not None:
            self._speech_s += time.monotonic() - self._speaking_since
            self._speaking_since = None
        return ProcessFrameResult.CONTINUE

    async def handle_user_turn_started(self):
        self._speech_s = 0.0  # sounds before the turn (resumed on, or while muted) are not its own

    async def handle_user_turn_stopped(self):
        ongoing = time.monotonic() - self._speaking_since if self._speaking_since is not None else 0.0
        self.last_turn_speech_s, self._speech_s = self._speech_s + ongoing, 0.0


def user_turn_strategies(
    *,
    speech_timeout_s: float,
    start: list[BaseUserTurnStartStrategy] | None = None,
    meter: TurnSpeechMeter | None = None,
    watchdog: EmptyTurnWatchdog | None = None,
    turn_analyzer: BaseTurnAnalyzer | EndOfTurnModel | None = None,
    hold: HoldRule | None = None,
    stt_in_flight: Callable[[], bool] = lambda: False,
    words_in_flight: Callable[[], bool] = lambda: False,
    preempt: bool = False,
    vad_state: Callable[[], VADState] | None = None,
) -> UserTurnStrategies:
    """Start and stop strategies for the caller's turns, the same in both modes.

    Turns end after ``speech_timeout_s`` of silence (predictable, unlike smart-turn, which can
    wait up to 3 s on short questions). A turn start interrupts whatever Annie is doing. With
    barge-in off, :class:`HalfDuplexMuteStrategy` keeps the caller's speech from reaching these
    strategies while she talks, so only a turn started while she is still thinking (before her
    first audio) supersedes the pending answer, as today. Emulating half-duplex with
    ``enable_interruptions=False`` instead would queue answers behind ignored speech.
    ``meter``, if given, goes first, so it sees every frame; ``watchdog`` closes turns that no
    transcript ends. With ``turn_analyzer`` (smart-turn, ``TURN_END=smart``) the turn ends when
    the model hears a complete utterance, or after its longest hold, instead of the timeout; with
    the end-of-turn language model (``TURN_END=adaptive``) the hold follows her words by ``hold``
    (:mod:`agent.turn_hold`), which also waits for words the STT still has in flight
    (``words_in_flight``).
    A transcript that is the late tail of the turn Annie is answering (the STT still had the
    caller's audio, ``stt_in_flight``, when she began) does not interrupt her
    (:class:`~agent.bargein.strategy.TranscriptTurnStartStrategy`). With ``preempt``
    (``PREEMPTIVE_GENERATION``) the answer starts ahead of the turn's end, as soon as the caller is
    quiet (``vad_state``: the VAD's state, for the moment her voice falls; :mod:`agent.preempt`).
    """
    start = start or [
        VADUserTurnStartStrategy(enable_interruptions=True),
        TranscriptTurnStartStrategy(stt_in_flight=stt_in_flight),
    ]
    if turn_analyzer is not None and not isinstance(turn_analyzer, BaseTurnAnalyzer):  # the end-of-turn model
        end = (PreemptiveAdaptiveHoldStopStrategy(model=turn_analyzer, rule=hold, words_in_flight=words_in_flight,
                                                  vad_state=vad_state) if preempt
               else AdaptiveHoldStopStrategy(model=turn_analyzer, rule=hold, words_in_flight=words_in_flight))
    elif turn_analyzer is not None:
        end = (PreemptiveTurnAnalyzerStopStrategy(turn_analyzer=turn_analyzer, vad_state=vad_state) if preempt
               else TurnAnalyzerUserTurnStopStrategy(turn_analyzer=turn_analyzer))
    else:
        end = (PreemptiveSpeechTimeoutStopStrategy(user_speech_timeout=speech_timeout_s, vad_state=vad_state) if preempt
               else SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=speech_timeout_s))
    return UserTurnStrategies(
        start=[meter, *start] if meter else start,
        stop=[
            end,
            *([watchdog] if watchdog else []),
        ],
    )


def mark_interrupted_reply(context: LLMContext, spoken: str) -> bool:
    """Mark the assistant message that was cut off, so the LLM knows the caller missed the rest.

    Pipecat already keeps only the text that was actually played (``spoken``); this appends a
    note to that message. Returns whether a message was marked.
    """
    messages = context.get_messages()
    for message in reversed(messages):
        if message.get("role") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str) and content.strip() == spoken.strip() and INTERRUPTED_MARK not in content:
            message["content"] = content.rstrip() + INTERRUPTED_MARK
            logger.debug("assistant reply marked as interrupted in the context")
            return True
        return False
    return False


def trim_context(context: LLMContext, max_messages: int) -> int:
    """Keep the conversation to its last ``max_messages`` messages, starting at a caller turn.

    A call can last hours; an unbounded context would end in a server that refuses every turn.
    The system prompt is not a context message (it is sent by the LLM service) and is kept.
    Returns how many messages were dropped.
    """
    messages = context.get_messages()
    if len(messages) <= max_messages:
        return 0
    start = len(messages) - max_messages
    while start < len(messages) and messages[start].get("role") != "user":
        start += 1
    context.set_messages(messages[start:])
    logger.debug(f"context trimmed: {start} old messages dropped")
    return start

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

import time

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_mute import BaseUserMuteStrategy
from pipecat.turns.user_start import (
    BaseUserTurnStartStrategy,
    TranscriptionUserTurnStartStrategy,
    VADUserTurnStartStrategy,
)
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

INTERRUPTED_MARK = " [cut off here: the caller interrupted, so they did not hear the rest]"


class HalfDuplexMuteStrategy(BaseUserMuteStrategy):
    """Mute the caller while Annie speaks and for ``holdoff_s`` after she stops.

    Mute strategies are evaluated on every frame reaching the user aggregator, and audio frames
    arrive every 10-20 ms, so the hold-off ends within one frame of its deadline.
    """

    def __init__(self, holdoff_s: float = 0.3):
        super().__init__()
        self._holdoff_s = holdoff_s
        self._bot_speaking = False
        self._muted_until = 0.0

    async def process_frame(self, frame: Frame) -> bool:
        await super().process_frame(frame)
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            self._muted_until = time.monotonic() + self._holdoff_s
        return self._bot_speaking or time.monotonic() < self._muted_until


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
) -> UserTurnStrategies:
    """Start and stop strategies for the caller's turns, the same in both modes.

    Turns end after ``speech_timeout_s`` of silence (predictable, unlike smart-turn, which can
    wait up to 3 s on short questions). A turn start interrupts whatever Annie is doing. With
    barge-in off, :class:`HalfDuplexMuteStrategy` keeps the caller's speech from reaching these
    strategies while she talks, so only a turn started while she is still thinking (before her
    first audio) supersedes the pending answer, as today. Emulating half-duplex with
    ``enable_interruptions=False`` instead would queue answers behind ignored speech.
    ``meter``, if given, goes first, so it sees every frame.
    """
    start = start or [
        VADUserTurnStartStrategy(enable_interruptions=True),
        TranscriptionUserTurnStartStrategy(enable_interruptions=True),
    ]
    return UserTurnStrategies(
        start=[meter, *start] if meter else start,
        stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=speech_timeout_s)],
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

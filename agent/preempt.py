"""Preemptive generation: answer as soon as the caller goes quiet, keep the answer only if the turn ends so.

With ``TURN_END=timeout`` a caller's turn ends ``USER_SPEECH_TIMEOUT_MS`` after the VAD stop (the
hold an elderly caller needs between two clauses); the LLM used to start only then. With
``PREEMPTIVE_GENERATION=1`` it starts on the final transcript of the quiet caller, while the turn
is still open, and the turn's end decides what becomes of the answer:

- the turn ends with the same words (case, punctuation and spacing aside): the answer, held until
  now, plays at once; the LLM is not run again;
- the caller speaks again before the turn ends (her voice starts), or the words changed, or the
  turn ended any other way (an interruption, the stop watchdog): the answer is withdrawn and
  nothing of it reaches the loudspeaker or the context; a turn that goes on is answered as usual.

The machinery is pipecat's (1.14): the speculative inference runs on a provisional copy of the
context, and the LLM service's ``SpeculationGate`` holds its output until the turn's end confirms
it (``UserStoppedSpeakingFrame``) or drops it (``EagerEndOfTurnCancelFrame``). What is ours is
when to speculate, here: :class:`Preemption` is the rule (pure, tables in
``tests/test_preempt.py``); :class:`PreemptiveSpeechTimeoutStopStrategy` carries it out on the
speech-timeout turn end. The TTS is not preempted: it starts on the released text.
"""

from __future__ import annotations

from enum import Enum

from loguru import logger
from pipecat.frames.frames import TranscriptionFrame, VADUserStartedSpeakingFrame
from pipecat.turns.types import UserTurnSpeculation
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_stop.eager_match_policy import EagerMatchPolicy, NormalizedMatch


class Act(Enum):
    SPECULATE = "speculate"  # start an answer on these words, the turn still open
    RESPECULATE = "respeculate"  # withdraw the answer in flight, start one on the new words
    WITHDRAW = "withdraw"  # drop the answer in flight
    CONFIRM = "confirm"  # the turn ended on the words answered: release the answer
    WITHDRAW_AND_ANSWER = "withdraw and answer"  # the turn ended on other words: drop, answer anew
    ANSWER = "answer"  # the turn ended with nothing in flight: answer as usual
    NOTHING = "nothing"


class Preemption:
    """The rule. Events: a final transcript (with the turn's words so far and whether the caller
    is quiet), the caller's voice starting, the turn ending, the turn reset. Each returns an
    :class:`Act`. ``words``: the turn's words the answer in flight was generated for."""

    def __init__(self, match: EagerMatchPolicy | None = None):
        self.match = match or NormalizedMatch()
        self.words: str | None = None

    def final(self, turn_words: str, *, caller_quiet: bool) -> Act:
        """A final transcript came; ``turn_words``: all the turn's words so far."""
        if not caller_quiet or not turn_words.strip():
            return Act.NOTHING  # she is still speaking: a turn end is not in sight
        if self.words is not None and self.match.matches(self.words, turn_words):
            return Act.NOTHING
        act = Act.RESPECULATE if self.words is not None else Act.SPECULATE
        self.words = turn_words
        return act

    def voice(self) -> Act:
        """The caller speaks again: the turn goes on, and the answer was too early."""
        return self._drop()

    def turn_ended(self, turn_words: str) -> Act:
        words, self.words = self.words, None
        if words is None:
            return Act.ANSWER
        return Act.CONFIRM if self.match.matches(words, turn_words) else Act.WITHDRAW_AND_ANSWER

    def reset(self) -> Act:
        """The turn ended (or began) by another way than its own end: nothing may stand."""
        return self._drop()

    def _drop(self) -> Act:
        if self.words is None:
            return Act.NOTHING
        self.words = None
        return Act.WITHDRAW


class PreemptiveSpeechTimeoutStopStrategy(SpeechTimeoutUserTurnStopStrategy):
    """Pipecat's speech-timeout turn end, answering ahead of it by :class:`Preemption`."""

    def __init__(self, *, match: EagerMatchPolicy | None = None, **kwargs):
        super().__init__(**kwargs)
        self.preemption = Preemption(match)
        self._parts: list[str] = []  # the turn's final transcripts (the base class's text has no spaces)
        self.confirmed = 0  # turns answered ahead of their end (for the logs and the bench)
        self.withdrawn = 0

    async def _handle_vad_user_started_speaking(self, frame: VADUserStartedSpeakingFrame):
        await self._carry_out(self.preemption.voice())
        await super()._handle_vad_user_started_speaking(frame)

    @property
    def turn_words(self) -> str:
        """The turn's words as the user aggregator joins them (parts with a space between)."""
        return " ".join(p for p in (part.strip() for part in self._parts) if p)

    async def _handle_transcription(self, frame: TranscriptionFrame):
        self._parts.append(frame.text)
        await super()._handle_transcription(frame)  # may end the turn (the hold was over already)
        if frame.finalized and self._parts:
            await self._carry_out(self.preemption.final(self.turn_words, caller_quiet=self._vad_stopped
                                                         and not self._vad_user_speaking))

    async def trigger_user_turn_stopped(self, *, enable_user_speaking_frames: bool | None = None):
        act = self.preemption.turn_ended(self.turn_words)
        if act is Act.CONFIRM:
            self.confirmed += 1
            logger.debug(f"{self}: the turn ended on the words answered ahead: releasing the answer")
            await self.trigger_user_turn_finalized(enable_user_speaking_frames=enable_user_speaking_frames,
                                                   confirms_speculation=True)
            return
        if act is Act.WITHDRAW_AND_ANSWER:
            await self._withdraw("the turn ended on other words")
        await super().trigger_user_turn_stopped(enable_user_speaking_frames=enable_user_speaking_frames)

    async def _reset(self, *, clear_vad_user_speaking: bool):
        await self._carry_out(self.preemption.reset())
        self._parts = []
        await super()._reset(clear_vad_user_speaking=clear_vad_user_speaking)

    async def _carry_out(self, act: Act) -> None:
        if act is Act.WITHDRAW:
            await self._withdraw("the caller went on, or the turn ended another way")
        elif act in (Act.SPECULATE, Act.RESPECULATE):
            if act is Act.RESPECULATE:
                await self._withdraw("the words changed")
            logger.debug(f"{self}: the caller is quiet: answering ahead of the turn's end")
            await self.trigger_user_turn_inference_triggered(speculation=UserTurnSpeculation(text=self.turn_words))

    async def _withdraw(self, why: str) -> None:
        self.withdrawn += 1
        logger.debug(f"{self}: the answer started ahead is withdrawn ({why})")
        await self.trigger_user_turn_speculation_cancelled()

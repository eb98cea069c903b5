"""Preemptive generation: answer as soon as the caller goes quiet, keep the answer only if the turn ends so.

The turn ends ``USER_SPEECH_TIMEOUT_MS`` after the VAD stop (``TURN_END=timeout``), or when
smart-turn hears a complete sentence (``TURN_END=smart``: at the VAD stop, or after a longer hold
on an unfinished one). Without preemption the LLM starts only then. With
``PREEMPTIVE_GENERATION=1`` it starts as soon as the caller is quiet, while the turn is still open:

- at the *quiet onset*: the VAD's speech probability fell (Silero's ``STOPPING``, ~30 ms after the
  last word, 200 ms before its stop), on the words so far (finals and the latest partial), and
  again on each partial that brings new words while her voice stays down (the STT's last chunk);
- at each final transcript that comes while she is quiet, if its words differ from those answered.

The turn's end decides what becomes of the answer: it ends on the same words (case, punctuation
and spacing aside) -> the answer, held until now, plays at once and the LLM is not run again; the
caller's voice comes back, or the turn ends on other words, or ends another way (an interruption,
the stop watchdog) -> the answer is withdrawn: nothing of it reaches the loudspeaker or the context,
and a turn that goes on is answered as usual.

The machinery is pipecat's (1.14): the speculative inference runs on a provisional copy of the
context, and the LLM service's ``SpeculationGate`` holds its output until the turn's end confirms
it (``UserStoppedSpeakingFrame``) or drops it (``EagerEndOfTurnCancelFrame``). What is ours is when
to speculate: :class:`Preemption` is the rule (pure, tables in ``tests/test_preempt.py``);
:class:`PreemptiveStop` carries it out on either turn end. The held answer's first sentence is
also synthesized ahead (``PREEMPTIVE_TTS``, on by default): the LLM service sends it past the gate
to the TTS, which buffers the audio and plays it only when the released answer asks for that
sentence (:mod:`processors.prefetch`); a withdrawal drops it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADState
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult, UserTurnSpeculation
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy, TurnAnalyzerUserTurnStopStrategy
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
    """The rule. Events: the caller quiet with the turn's words so far, her voice back, the turn
    ending with its words, the turn reset. Each returns an :class:`Act`. ``words``: the words the
    answer in flight was generated for."""

    def __init__(self, match: EagerMatchPolicy | None = None):
        self.match = match or NormalizedMatch()
        self.words: str | None = None

    def quiet(self, turn_words: str) -> Act:
        """The caller is quiet and these are the turn's words (a final came, or her voice fell)."""
        if not turn_words.strip():
            return Act.NOTHING
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


def vad_state_of(vad: VADAnalyzer | None) -> Callable[[], VADState] | None:
    """The VAD's state after the frame it last analysed (pipecat keeps it in ``_vad_state``, set
    once the pipeline gives the VAD its sample rate, with no public accessor in 1.14;
    ``tests/test_preempt.py`` fails if that changes)."""
    if vad is None:
        return None
    return lambda: getattr(vad, "_vad_state", VADState.QUIET)  # noqa: SLF001 - see the docstring


class PreemptiveStop:
    """Mixin for a pipecat user-turn stop strategy: answers ahead of the turn's end by :class:`Preemption`.

    It follows the frames itself (the caller's voice, partials, finals, and, with ``vad_state``,
    the VAD's state at each audio frame) and takes over ``trigger_user_turn_stopped``, so the
    strategy under it decides only when the turn ends.
    """

    def __init__(self, *, match: EagerMatchPolicy | None = None,
                 vad_state: Callable[[], VADState] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.preemption = Preemption(match)
        self._vad_state = vad_state
        self._finals: list[str] = []  # the turn's final transcripts
        self._partial = ""  # the latest partial since the last final
        self._speaking = False  # between the VAD's start and stop
        self._falling = False  # the VAD's speech probability fell (STOPPING) since it last rose
        # A caller turn is open: sounds while none is (a backchannel over Annie that pause-first
        # barge-in resumes on) start no answer.
        self._in_turn = False
        self.speculated = 0  # answers started ahead, confirmed and withdrawn (logs, the bench)
        self.confirmed = 0
        self.withdrawn = 0

    @property
    def turn_words(self) -> str:
        """The turn's words as the user aggregator joins them (finals, a space between)."""
        return _join(self._finals)

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._speaking, self._falling = True, False
            await self._carry_out(self.preemption.voice())
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speaking, self._falling = False, False
        elif isinstance(frame, InterimTranscriptionFrame):
            self._partial = frame.text
            if self._falling:  # words still coming in after her voice fell: answer those
                await self._carry_out(self.preemption.quiet(_join([*self._finals, self._partial])))
        elif isinstance(frame, TranscriptionFrame):
            self._finals.append(frame.text)
            self._partial = ""
        elif isinstance(frame, InputAudioRawFrame) and self._speaking and self._vad_state is not None:
            await self._follow_the_voice(self._vad_state())
        result = await super().process_frame(frame)  # may end the turn (then the words are gone)
        if isinstance(frame, TranscriptionFrame) and frame.finalized and not self._speaking:
            await self._carry_out(self.preemption.quiet(self.turn_words))
        return result

    async def _follow_the_voice(self, state: VADState) -> None:
        if state == VADState.STOPPING and not self._falling:
            self._falling = True
            await self._carry_out(self.preemption.quiet(_join([*self._finals, self._partial])))
        elif state == VADState.SPEAKING and self._falling:
            self._falling = False  # a breath, not the end: she goes on
            await self._carry_out(self.preemption.voice())

    async def trigger_user_turn_stopped(self, *, enable_user_speaking_frames: bool | None = None):
        act = self.preemption.turn_ended(self.turn_words)
        self._finals, self._partial = [], ""  # the turn is over: no word of it may start another answer
        if act is Act.CONFIRM:
            self.confirmed += 1
            logger.debug(f"{self}: the turn ended on the words answered ahead: releasing the answer")
            await self.trigger_user_turn_finalized(enable_user_speaking_frames=enable_user_speaking_frames,
                                                   confirms_speculation=True)
            return
        if act is Act.WITHDRAW_AND_ANSWER:
            await self._withdraw("the turn ended on other words")
        await super().trigger_user_turn_stopped(enable_user_speaking_frames=enable_user_speaking_frames)

    async def handle_user_turn_started(self):
        await self._turn_boundary()
        self._in_turn = True
        await super().handle_user_turn_started()

    async def handle_user_turn_stopped(self):
        await self._turn_boundary()
        self._in_turn = False
        await super().handle_user_turn_stopped()

    async def _turn_boundary(self) -> None:
        await self._carry_out(self.preemption.reset())
        self._finals, self._partial, self._falling = [], "", False

    async def _carry_out(self, act: Act) -> None:
        if act is Act.WITHDRAW:
            await self._withdraw("the caller went on, or the turn ended another way")
        elif act in (Act.SPECULATE, Act.RESPECULATE):
            if not self._in_turn:
                self.preemption.reset()
                return
            if act is Act.RESPECULATE:
                await self._withdraw("the words changed")
            self.speculated += 1
            logger.debug(f"{self}: the caller is quiet: answering ahead of the turn's end")
            await self.trigger_user_turn_inference_triggered(speculation=UserTurnSpeculation(text=self.preemption.words))

    async def _withdraw(self, why: str) -> None:
        self.withdrawn += 1
        logger.debug(f"{self}: the answer started ahead is withdrawn ({why})")
        await self.trigger_user_turn_speculation_cancelled()


class PreemptiveSpeechTimeoutStopStrategy(PreemptiveStop, SpeechTimeoutUserTurnStopStrategy):
    """``TURN_END=timeout``, answering ahead."""


class PreemptiveTurnAnalyzerStopStrategy(PreemptiveStop, TurnAnalyzerUserTurnStopStrategy):
    """``TURN_END=smart``, answering ahead."""


def _join(parts: list[str]) -> str:
    return " ".join(p for p in (part.strip() for part in parts) if p)

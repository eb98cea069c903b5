"""Pause first, then decide: the barge-in decision core. Pure: no pipecat, no asyncio, no clock.

Events come in with the time they happened (the caller's voice starting and stopping, partial
and final words, Annie starting and stopping, her playback silent after a pause, a turn
starting, a tick); actions come out (pause,
resume, commit, start a turn, reset the transcript, "wake me at t"). The pipecat start strategy
(:mod:`agent.bargein.strategy`) feeds it frames and carries out its actions; tests and replays
feed it tables of events with their own clock.

While Annie speaks, the rules are:

1. the caller's voice pauses Annie's playback at once (the reply that was generated is kept);
2. the partial transcripts decide within ``window_s`` of the pause:
   - real words (not a backchannel, not a hum, not an echo of Annie's own words) -> commit: the
     caller's turn starts as an interruption (LLM and TTS cancelled, queued audio dropped);
   - the caller still speaking when the window ends -> commit (a caller who keeps talking wins);
   - the speech ended with only backchannel words ("mm-hm", "okay") or none (a cough, a door)
     -> resume Annie where she paused; the LLM context is unchanged. She never resumes before the
     caller has been quiet for ``resume_quiet_s`` after the VAD stop: a caller who pauses at a
     comma ("Wait, ... stop please") is one utterance, and her voice coming back within that
     hold keeps Annie paused and the decision going;
   - a sound over within ``blip_s`` of the pause with no words (Annie's own echo stops when she
     does, a click) decides at once; one that lasted ``long_sound_s`` with no words yet is most
     likely speech the STT has not caught up with: Annie stays paused until its final (at most
     ``final_wait_s`` after the VAD stop), even past the window; a shorter one waits at most
     ``final_grace_s``. A final without real words decides at once;
3. words that come after a resume (a busy machine, a slow final) still commit within
   ``late_words_s``, unless the sound was a blip (echo) or the words are backchannels or echo;
4. words of the turn Annie is answering that come late (an STT slower than real time still had
   the caller's audio in flight when Annie began: the VAD split her question, and its tail's final
   comes while Annie answers the head) are not an interruption: they are dropped, as a
   half-duplex call drops them (:class:`AnsweredTurnTail`);
5. with the caller-voice gate, a sound that is clearly not the caller's voice (the TV, another
   person, Annie's echo) resumes her at once, and its words never commit.

When Annie is not speaking, a turn starts on the caller's voice or on a transcript, as usual.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from transports.words import words_of

# The words a listener says to keep the speaker going (BACKCHANNEL_WORDS; hums are recognised apart).
DEFAULT_BACKCHANNELS = (
    "mm-hm", "mhm", "hmm", "uh-huh", "yeah", "yes", "yep", "okay", "ok", "right", "sure", "alright",
    "i see", "aha", "oh",
)

# "mm", "mhm", "hmm", "uh-huh", "umm" as STTs spell them ("M-M-H-M.", "Mmm", "MME.", "Uh huh"):
# letters only.
_HUM = re.compile(r"^(?:[mh]+|[mh]{2,}e|u+h+|u+m+|a+h+|o+h+)$")


@dataclass(frozen=True)
class BargeInParams:
    """Every threshold of the decision, in seconds. Settable ones come from the settings
    (:meth:`from_settings`); the others are fixed for the reasons given."""

    # BARGE_IN_DECIDE_MS: counted from the pause; long enough for a drawn-out "mm-hm" and the
    # VAD's stop time to end inside it.
    window_s: float = 1.3
    # BARGE_IN_RESUME_QUIET_MS: quiet after the VAD stop before Annie may resume.
    resume_quiet_s: float = 0.3
    # RESUME_BACKUP_MS: how far back Annie starts again on a resume (to repeat a cut word).
    resume_backup_ms: int = 0
    # Fixed: a shorter sound than the VAD's stop time (200 ms) plus a frame cannot be speech the
    # caller meant; Annie's echo stops within it of her pause.
    blip_s: float = 0.3
    # Fixed: how long a short sound's final may take after the VAD stop (Whisper on a quiet
    # machine, Nemotron's final ~20 ms); longer than that costs Annie's flow for every cough.
    final_grace_s: float = 0.5
    # Fixed: a sound this long is speech more often than not (a cough is ~0.3-0.6 s).
    long_sound_s: float = 0.8
    # Fixed: the most Annie waits for a long sound's final after the VAD stop.
    final_wait_s: float = 1.2
    # Fixed: words of a "waited" utterance arriving this long after the resume still commit.
    late_words_s: float = 2.0
    backchannels: frozenset[str] = field(
        default_factory=lambda: frozenset(w for phrase in DEFAULT_BACKCHANNELS for w in words_of(phrase))
    )

    @classmethod
    def from_settings(cls, settings: Any) -> BargeInParams:
        return cls(
            window_s=settings.barge_in_decide_ms / 1000,
            resume_quiet_s=settings.barge_in_resume_quiet_ms / 1000,
            resume_backup_ms=settings.resume_backup_ms,
            backchannels=backchannel_words(settings.backchannels),
        )


def backchannel_words(phrases: Iterable[str]) -> frozenset[str]:
    return frozenset(w for phrase in phrases for w in words_of(phrase))


class Phase(Enum):
    LISTENING = "listening"  # Annie is not paused; nothing of the current utterance was resumed on
    PAUSED = "paused"  # Annie is paused on the caller's voice; the decision is pending
    RESUMED = "resumed"  # Annie resumed on the current utterance; its words come late


class Resumed(Enum):
    """How an utterance was resumed on."""

    BLIP = "blip"  # over with the pause and no words: Annie's echo, or a click
    WAITED = "waited"  # it lasted, but no real words came in time
    NOT_CALLER = "not caller"  # the caller-voice gate said it was another voice (TV, echo)


@dataclass
class _Paused:
    """The PAUSED state: what is known of the sound that paused Annie."""

    at: float  # the pause; then the moment Annie was silent (the window and the blip count from it)
    words: bool = False  # words that are not Annie's own came while paused
    blip: bool = False  # it ended within blip_s of the pause, with no words


@dataclass(frozen=True)
class _Resumed:
    """The RESUMED state: how and when Annie resumed on the current utterance."""

    how: Resumed
    at: float


class Flow(Enum):
    """What the frame that carried an event does next among the start strategies."""

    CONTINUE = "continue"
    STOP = "stop"


@dataclass(frozen=True)
class Pause:
    """Silence Annie now; keep what she has not played."""


@dataclass(frozen=True)
class Resume:
    """Play on from the pause (``backup_ms`` earlier)."""

    backup_ms: int = 0


@dataclass(frozen=True)
class Commit:
    """Start the caller's turn as an interruption of Annie."""

    why: str


@dataclass(frozen=True)
class StartTurn:
    """Start the caller's turn (Annie is not speaking)."""


@dataclass(frozen=True)
class ResetAggregation:
    """Forget the transcript gathered so far (words that were not a turn)."""


@dataclass(frozen=True)
class WakeAt:
    """Call :meth:`BargeInCore.tick` at (or after) ``t``."""

    t: float


Action = Pause | Resume | Commit | StartTurn | ResetAggregation | WakeAt


@dataclass
class Outcome:
    actions: list[Action] = field(default_factory=list)
    flow: Flow = Flow.CONTINUE


class AnsweredTurnTail:
    """Whether words that come while Annie speaks are the late tail of the turn she is answering.

    Every STT here finalizes on a VAD stop, and the segmented ones (Whisper, the Parakeet sidecar)
    one segment at a time, slower than real time on a busy CPU. When the VAD splits a question
    ("What is the weather like ... for the rest of the day") and the turn ends on the head's final,
    the tail's final comes while Annie answers. It is not the caller talking over her: no voice of
    hers started since Annie did. The rule: if the STT had the caller's audio in flight when Annie
    started (and the caller was not speaking), then words before any new voice, and a final before
    the VAD stop of a voice that started since, are that tail; the first final settles it. Without
    audio in flight at her start, nothing is a tail (words with no voice are judged as before).
    """

    def __init__(self) -> None:
        self.owed = False  # a final of audio from before Annie started is still to come
        self._voice_since_start = False

    def bot_started(self, audio_in_flight: bool, caller_speaking: bool) -> None:
        self.owed = audio_in_flight and not caller_speaking
        self._voice_since_start = False

    def bot_stopped(self) -> None:
        self.owed = False

    def voice_started(self) -> None:
        self._voice_since_start = True

    def is_tail(self, *, final: bool, utterance_stopped: bool) -> bool:
        """Whether these words (``final`` or a partial) are the tail; ``utterance_stopped``: the
        caller's current utterance has had its VAD stop."""
        if not self.owed:
            return False
        tail = not self._voice_since_start or (final and not utterance_stopped)
        if tail and final:
            self.owed = False
        return tail


class BargeInCore:
    """The decision, as a state machine. Each method takes the event's time ``now`` (seconds on
    any monotonic clock) and returns the actions to take, in order."""

    def __init__(self, params: BargeInParams | None = None):
        self.params = params or BargeInParams()
        # The state: LISTENING (None), PAUSED (its sound's facts) or RESUMED (how and when).
        self._state: _Paused | _Resumed | None = None
        self.bot_speaking = False
        self.caller_speaking = False
        # When the decision is due (PAUSED only; the time a WakeAt asked for).
        self.wake_at: float | None = None
        self._quiet_since = 0.0  # the caller's last VAD stop
        self._stopped_since_start = True  # a VAD stop came since the current utterance's start
        self._previous_resumed: _Resumed | None = None  # the utterance before, if resumed on (its final may come)
        self._tail = AnsweredTurnTail()
        # ("commit" | "resume", seconds after the pause) or ("commit late", seconds after the resume)
        self.decisions: list[tuple[str, float]] = []

    @property
    def phase(self) -> Phase:
        if isinstance(self._state, _Paused):
            return Phase.PAUSED
        return Phase.RESUMED if isinstance(self._state, _Resumed) else Phase.LISTENING

    # --- events --------------------------------------------------------------------------------

    def bot_started(self, now: float, caller_audio_in_flight: bool = False) -> Outcome:
        """Annie started speaking; ``caller_audio_in_flight``: the STT still had audio of the
        caller's to transcribe (see :class:`AnsweredTurnTail`)."""
        self.bot_speaking = True
        self._tail.bot_started(caller_audio_in_flight, self.caller_speaking)
        return Outcome()

    def bot_stopped(self, now: float) -> Outcome:
        self.bot_speaking = False
        self._tail.bot_stopped()
        return Outcome()

    def turn_started(self, now: float) -> Outcome:
        """The caller's turn started (here or by another strategy): nothing is pending any more."""
        self.wake_at = None
        if isinstance(self._state, _Paused):
            self._state = None
        return Outcome()

    def voice_started(self, now: float) -> Outcome:
        self.caller_speaking = True
        self._stopped_since_start = False
        self._tail.voice_started()
        state = self._state
        self._previous_resumed = state if isinstance(state, _Resumed) else None
        if isinstance(state, _Resumed):
            self._state = None
        if isinstance(state, _Paused):
            # The caller goes on after a short gap, still paused: the same utterance. The decision
            # is due at the window's end again (at once, with a commit, if that has passed).
            return self._wake(max(self.wake_at or 0.0, state.at + self.params.window_s))
        if not self.bot_speaking:
            return Outcome([StartTurn()], Flow.STOP)
        self._state = _Paused(at=now)  # ``at`` until the playback says it is silent (playback_paused)
        return Outcome([Pause()])

    def playback_paused(self, now: float) -> Outcome:
        """Annie is silent (the :class:`Pause` was carried out; a sink may take a few ms to flush):
        the window, and the blip's measure, start here."""
        if not isinstance(self._state, _Paused):
            return Outcome()
        self._state.at = now
        return self._wake(now + self.params.window_s)

    def voice_stopped(self, now: float) -> Outcome:
        self.caller_speaking = False
        self._stopped_since_start = True
        self._quiet_since = now
        paused = self._state
        if not isinstance(paused, _Paused):
            return Outcome()
        lasted = now - paused.at
        paused.blip = lasted <= self.params.blip_s and not paused.words
        if paused.blip:
            return self._wake(now)
        if lasted >= self.params.long_sound_s:
            return self._wake(now + self.params.final_wait_s)
        return self._wake(min(self.wake_at or now, now + self.params.final_grace_s))

    def words(self, now: float, text: str, *, final: bool, annies_words: Iterable[str] = (),
              earlier: bool = False) -> Outcome:
        """A partial (or, with ``final``, the final) transcript; ``annies_words`` are the words
        Annie is saying or just said (her echo, if the STT hears it); ``earlier``: the STT says this
        final transcribes a segment that ended before the sound Annie is paused on began (its
        backlog: a slow STT's finals come one segment at a time, in order)."""
        words = words_of(text)
        if not words:
            return Outcome()
        echo = frozenset(annies_words)
        if self.bot_speaking and self._tail.is_tail(final=final, utterance_stopped=self._stopped_since_start):
            return Outcome([ResetAggregation()])  # the turn Annie is answering: not an interruption
        if final and earlier and isinstance(self._state, _Paused):
            # Not this sound's words. An utterance resumed on is judged by the late-words rule;
            # any other earlier one was the turn Annie is answering.
            resumed, self._previous_resumed = self._previous_resumed, None
            return self._late_words(now, words, resumed, echo) if resumed else Outcome([ResetAggregation()])
        if final and not self._stopped_since_start and self._previous_resumed:
            # Every STT here finalizes on a VAD stop, so a final before this utterance's stop is
            # the late final of the previous one, which was judged and resumed on.
            resumed, self._previous_resumed = self._previous_resumed, None
            return self._late_words(now, words, resumed, echo)
        if isinstance(self._state, _Resumed):
            # Every partial and the final of an utterance that was resumed on, until the caller's
            # next one starts: none may open a turn of its own (a turn opened by a partial has no
            # text and holds the caller's next question until pipecat's stop watchdog).
            return self._late_words(now, words, self._state, echo)
        paused = isinstance(self._state, _Paused)
        if not paused and not self.bot_speaking:
            return Outcome([StartTurn()], Flow.STOP)
        if paused and not _all_in(words, echo):
            self._state.words = True  # Annie's own words do not make a sound more than a blip
        if self._real_words(words, echo):
            return self._commit(now, "words")
        if final and paused and self._stopped_since_start:
            return self._wake(now)  # the final is in, and no real words: decide now
        return Outcome()

    def voice_verdict(self, now: float, not_caller: bool) -> Outcome:
        """The caller-voice gate's verdict on the sound that paused Annie (see
        :mod:`agent.bargein.gate`). Clearly not the caller: resume now, by the backchannel's path,
        and its words will not commit later. Anything else leaves the rules as they are, so the
        gate never decides later than they would."""
        if not isinstance(self._state, _Paused) or not not_caller:
            return Outcome()
        self.wake_at = None
        return self._resume(now, Resumed.NOT_CALLER)

    def tick(self, now: float) -> Outcome:
        """The time asked for by :class:`WakeAt` has come (an early or stray tick does nothing)."""
        if self.wake_at is None or now < self.wake_at:
            return Outcome([WakeAt(self.wake_at)] if self.wake_at is not None else [])
        if not isinstance(self._state, _Paused):
            self.wake_at = None
            return Outcome()
        quiet_until = self._quiet_since + self.params.resume_quiet_s
        if not self.caller_speaking and now < quiet_until:
            return self._wake(quiet_until)  # hold: the caller may only be between two words
        self.wake_at = None
        if self.caller_speaking:
            return self._commit(now, "kept talking")
        return self._resume(now, Resumed.BLIP if self._state.blip else Resumed.WAITED)

    # --- rules ---------------------------------------------------------------------------------

    def _real_words(self, words: list[str], echo: frozenset[str]) -> bool:
        """Some word that is not a backchannel, a hum, or one Annie is saying (her echo)."""
        content = [w for w in words if w not in self.params.backchannels and not _HUM.match(w)]
        return bool(content) and not _all_in(content, echo)

    def _late_words(self, now: float, words: list[str], resumed: _Resumed, echo: frozenset[str]) -> Outcome:
        """Words of an utterance Annie already resumed on. A blip's words stand as decided; an
        utterance that lasted but whose real words came late is the caller's, within
        ``late_words_s`` of the resume. Backchannels and echo stay ignored."""
        since = now - resumed.at
        if resumed.how is Resumed.WAITED and since <= self.params.late_words_s and self._real_words(words, echo):
            self.decisions.append(("commit late", since))
            self.wake_at = None
            self._state = None
            return Outcome([Commit("words after the resume")], Flow.STOP)
        return Outcome([ResetAggregation()])

    def _commit(self, now: float, why: str) -> Outcome:
        if isinstance(self._state, _Paused):
            self.decisions.append(("commit", now - self._state.at))
            self._state = None
        self.wake_at = None
        return Outcome([Commit(why)], Flow.STOP)

    def _resume(self, now: float, how: Resumed) -> Outcome:
        self.decisions.append(("resume", now - self._state.at))
        self._state = _Resumed(how, now)
        return Outcome([ResetAggregation(), Resume(self.params.resume_backup_ms)])

    def _wake(self, t: float) -> Outcome:
        self.wake_at = t
        return Outcome([WakeAt(t)])


def _all_in(words: list[str], echo: frozenset[str]) -> bool:
    return all(w in echo for w in words)

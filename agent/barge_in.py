"""Pause first, then decide: barge-in that survives coughs, TV bursts and "mm-hm".

Pipecat cancels everything on the first sound and cannot resume. With streaming partial
transcripts Annie can do better. :class:`PauseThenDecideStartStrategy` is a user-turn start
strategy (Pipecat 1.x) that, while Annie speaks:

1. pauses her playback at the sink the moment VAD hears the caller (so the caller is never
   talked over; the reply that was generated is kept);
2. decides from the partial transcripts within ``window_s``:
   - real words that are not a backchannel and not an echo of Annie's own words -> commit: the
     caller's turn starts with an interruption (LLM and TTS cancelled, queued audio dropped);
   - the caller still speaking when the window ends -> commit (a caller who keeps talking wins);
   - the speech ended with only backchannel words ("mm-hm", "okay") or none at all (a cough,
     a door) -> resume Annie's speech where it paused; the LLM context is unchanged. She never
     resumes until the caller has been quiet for ``resume_quiet_s`` after the VAD stop: a caller
     who pauses at a comma ("Wait, ... stop please") is one utterance, not a blip and a new
     pause, and the voice coming back within that hold keeps Annie paused and the decision going.
     A sound that lasted (``long_sound_s``) but has no words yet is most likely speech the STT
     has not caught up with: Annie stays paused until its final transcript (at most
     ``final_wait_s`` after the VAD stop), even past the window. A final without real words
     decides at once.
3. words that come after a resume (a busy machine, a slow final) still commit, within a bound,
   unless the sound was a blip over with the pause (echo) or the words are backchannels or echo.

When Annie is not speaking, a turn starts on VAD or on a transcript, as usual.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start import BaseUserTurnStartStrategy

from transports.playback import PausablePlayback, words_of

# "mm", "mhm", "hmm", "uh-huh", "umm" as STTs spell them ("M-M-H-M.", "Mmm", "MME.", "Uh huh"):
# letters only.
_HUM = re.compile(r"^(?:[mh]+|[mh]{2,}e|u+h+|u+m+|a+h+|o+h+)$")

DEFAULT_BACKCHANNELS = (
    "mm", "hm", "mhm", "mm-hm", "mmhm", "uh-huh", "uh", "huh", "um", "hmm", "yeah", "yes", "yep",
    "ok", "okay", "right", "sure", "alright", "i see", "aha", "oh",
)


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
    """Start the caller's turn; while Annie speaks, pause her first and decide (see module doc)."""

    def __init__(
        self,
        *,
        playback: PausablePlayback,
        window_s: float = 1.3,
        final_grace_s: float = 0.5,
        blip_s: float = 0.3,
        late_words_s: float = 2.0,
        backchannels: Iterable[str] = DEFAULT_BACKCHANNELS,
        resume_backup_ms: int = 0,
        resume_quiet_s: float = 0.3,
        long_sound_s: float = 0.8,
        final_wait_s: float = 1.2,
    ):
        super().__init__(enable_interruptions=True)
        self._playback = playback
        self._window_s = window_s
        self._final_grace_s = final_grace_s
        self._blip_s = blip_s
        self._late_words_s = late_words_s
        self._words_while_paused = False
        self._backchannels = {w for phrase in backchannels for w in words_of(phrase)}
        self._resume_backup_ms = resume_backup_ms
        self._resume_quiet_s = resume_quiet_s
        self._long_sound_s = long_sound_s
        self._final_wait_s = final_wait_s
        self._quiet_since = 0.0  # the caller's last VAD stop
        self._bot_speaking = False
        self._caller_speaking = False
        self._paused_at: float | None = None
        # How the caller's current utterance was resumed on (None: it was not), and the one
        # before it (its final may still be on its way): "blip" (over with the pause, no words:
        # echo or a click) or "waited" (it lasted, but no words came in time).
        self._resumed_utterance: str | None = None
        self._previous_resumed: str | None = None
        self._resumed_at = 0.0
        self._stopped_since_start = True  # a VAD stop came since the current utterance's start
        self._blip = False  # the paused utterance ended within blip_s of the pause, with no words
        self._deadline = 0.0
        self._timer: asyncio.Task | None = None
        self._committing = False
        # The caller's current turn began as an interruption committed here (so Annie was cut off
        # and owes the caller an answer, even if no words come).
        self.turn_interrupted_annie = False
        # ("commit" | "resume", seconds after the pause) or ("commit late", seconds after the resume)
        self.decisions: list[tuple[str, float]] = []

    async def handle_user_turn_started(self):
        self._cancel_timer()
        self._paused_at = None
        self.turn_interrupted_annie, self._committing = self._committing, False

    async def cleanup(self):
        self._cancel_timer()
        await super().cleanup()

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._caller_speaking = True
            self._previous_resumed = self._resumed_utterance
            self._resumed_utterance = None
            self._stopped_since_start = False
            return await self._on_voice()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._caller_speaking = False
            self._stopped_since_start = True
            self._quiet_since = now = time.monotonic()
            if self._paused_at is not None:
                # A sound that ended within a blip of the pause, with no words, was Annie's own
                # echo (it stops when she does) or a click: resume at once. Otherwise wait a
                # moment for the final transcript before resuming; a long sound (most likely
                # speech whose words the STT has not caught up with) waits for it even past the
                # window. A final without real words decides at once (see _on_words).
                lasted = now - self._paused_at
                self._blip = lasted <= self._blip_s and not self._words_while_paused
                if self._blip:
                    self._reschedule(now)
                elif lasted >= self._long_sound_s:
                    self._reschedule(now + self._final_wait_s)
                else:
                    self._reschedule(min(self._deadline, now + self._final_grace_s))
        elif isinstance(frame, InterimTranscriptionFrame):
            return await self._on_words(frame.text)
        elif isinstance(frame, TranscriptionFrame):
            return await self._on_words(frame.text, final=True)
        return ProcessFrameResult.CONTINUE

    async def _on_voice(self) -> ProcessFrameResult:
        if self._paused_at is not None:
            # The caller goes on after a short gap, still paused: the same utterance. The decision
            # is due at the window's end again (at once, with a commit, if that has passed).
            self._reschedule(max(self._deadline, self._paused_at + self._window_s))
            return ProcessFrameResult.CONTINUE
        if not self._bot_speaking:
            await self.trigger_user_turn_started()
            return ProcessFrameResult.STOP
        await self._playback.pause_playback()
        self._paused_at = time.monotonic()
        self._words_while_paused = False
        self._blip = False
        self._reschedule(self._paused_at + self._window_s)
        logger.debug(f"{self}: caller voice while Annie speaks: playback paused, deciding")
        return ProcessFrameResult.CONTINUE

    async def _on_words(self, text: str, final: bool = False) -> ProcessFrameResult:
        words = words_of(text)
        if not words:
            return ProcessFrameResult.CONTINUE
        if final and not self._stopped_since_start and self._previous_resumed:
            # Every STT here finalizes on a VAD stop, so a final before this utterance's stop is
            # the late final of the previous one, which was judged and resumed on.
            how, self._previous_resumed = self._previous_resumed, None
            return await self._on_late_words(words, how)
        if self._paused_at is None and self._resumed_utterance:
            # Every partial and the final of an utterance that was resumed on, until the caller's
            # next one starts: none of them may open a turn of its own (a turn opened by a partial
            # has no text and holds the caller's next question until pipecat's stop watchdog).
            return await self._on_late_words(words, self._resumed_utterance)
        if self._paused_at is None and not self._bot_speaking:
            await self.trigger_user_turn_started()
            return ProcessFrameResult.STOP
        if self._paused_at is not None and not self._annies_own(words):
            # Annie's own words (her echo, transcribed) do not make a sound more than a blip.
            self._words_while_paused = True
        if self._real_words(words):
            await self._commit("words")
            return ProcessFrameResult.STOP
        if final and self._paused_at is not None and self._stopped_since_start:
            self._reschedule(time.monotonic())  # the final is in, and no real words: decide now
        return ProcessFrameResult.CONTINUE

    async def _on_late_words(self, words: list[str], how: str) -> ProcessFrameResult:
        """Words of an utterance Annie already resumed on, arriving after the decision.

        A blip's words stand as decided (the sound was over with the pause: Annie's own echo, or
        an STT's invention on a click). An utterance that lasted but whose words came too late
        (the STT lagging the VAD on a busy machine, a slow final) is the caller's: real words
        within ``late_words_s`` of the resume commit the interruption then, so no question is
        lost; backchannels and echo stay ignored.
        """
        if how == "waited" and time.monotonic() - self._resumed_at <= self._late_words_s and self._real_words(words):
            self.decisions.append(("commit late", time.monotonic() - self._resumed_at))
            logger.debug(f"{self}: words after the resume: interruption committed")
            self._cancel_timer()
            self._paused_at = None
            self._resumed_utterance = None
            await self._start_interrupting_turn()
            return ProcessFrameResult.STOP
        await self.trigger_reset_aggregation()
        return ProcessFrameResult.CONTINUE

    def _annies_own(self, words: list[str]) -> bool:
        echo = self._playback.recent_bot_words()
        return all(w in echo for w in words)

    def _real_words(self, words: list[str]) -> bool:
        """Some word that is not a backchannel, a hum, or one Annie is saying (her echo)."""
        content = [w for w in words if w not in self._backchannels and not _HUM.match(w)]
        return bool(content) and not self._annies_own(content)

    async def _decide_at_deadline(self) -> None:
        while True:
            while time.monotonic() < self._deadline:
                await asyncio.sleep(max(0.005, self._deadline - time.monotonic()))
            quiet_until = self._quiet_since + self._resume_quiet_s
            if self._paused_at is None or self._caller_speaking or time.monotonic() >= quiet_until:
                break
            self._deadline = quiet_until  # hold: the caller may only be between two words
        self._timer = None
        if self._paused_at is None:
            return
        if self._caller_speaking:
            await self._commit("kept talking")
        else:
            await self._resume()

    async def _commit(self, why: str) -> None:
        self._record("commit")
        logger.debug(f"{self}: interruption committed ({why})")
        self._cancel_timer()
        self._paused_at = None
        await self._start_interrupting_turn()

    async def _start_interrupting_turn(self) -> None:
        self._committing = True
        try:
            await self.trigger_user_turn_started()
        finally:
            self._committing = False

    async def _resume(self) -> None:
        self._record("resume")
        logger.debug(f"{self}: no real words: resuming Annie")
        self._paused_at = None
        self._resumed_utterance = "blip" if self._blip else "waited"
        self._resumed_at = time.monotonic()
        await self.trigger_reset_aggregation()
        await self._playback.resume_playback(self._resume_backup_ms)

    def _record(self, decision: str) -> None:
        if self._paused_at is not None:
            self.decisions.append((decision, time.monotonic() - self._paused_at))

    def _reschedule(self, deadline: float) -> None:
        """Decide at ``deadline`` (a new timer: a sleeping one would not see an earlier deadline)."""
        self._cancel_timer()
        self._deadline = deadline
        self._timer = self.task_manager.create_task(self._decide_at_deadline(), f"{self}::decide")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        self._timer = None

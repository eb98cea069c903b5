"""Shadow mode: a half-duplex call that also records what barge-in would have done.

The household keeps barge-in off until it is validated on its own line. With ``BARGE_IN_SHADOW=1``
(and ``ENABLE_BARGE_IN=0``) the call behaves exactly as half-duplex, and beside it, while Annie
speaks, a second VAD (with the pause-first parameters) and the decision core
(:mod:`agent.bargein.core`) run as if barge-in were on: every would-be pause, resume and commit
is recorded with its time, the caller's line level and Annie's level at that moment. Words reach
the core where the STT transcribes while the caller is muted; otherwise it decides by the voice
alone (its window, blip and long-sound rules). With ``CALLER_GATE=1`` the caller-voice gate
(:mod:`agent.bargein.gate_taps`) runs on the shadow's VAD too, enrolling the caller while Annie is
silent and Annie from her TTS audio: each verdict on a sound over Annie is recorded with its
scores and given to the decision as barge-in would give it. Nothing here touches the audio path:
the taps push every frame on before they look at it (the tap before the user aggregator looks on a
task of its own, so the call's frames never wait for it), and the gate's embeddings run beside the
call (it never waits for them).

A call's records (JSON lines, no words of the conversation) go to ``SHADOW_DIR``, one file per
call, the oldest removed beyond ``SHADOW_KEEP_CALLS``; the summary is logged at the call's end
and shown on the status endpoint. ``python -m agent.bargein.shadow_report`` (``bash start.sh
report``) reads them and gives the verdict.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADState
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from agent.bargein.core import BargeInCore, BargeInParams, Commit, Outcome, Pause, Resume, StartTurn
from agent.bargein.gate import Scored, Verdict
from agent.bargein.gate_taps import RATE as GATE_RATE
from agent.bargein.gate_taps import AnnieVoice, GateWorker, VoiceJudge
from agent.bargein.recording import ACTION_NAMES, EventLog

RECORD_VERSION = 1
MAX_RECORDS = 20000  # a call's records are bounded (a day-long call keeps its first 20,000)
FOLLOW_BEHIND_MAX = 500  # frames the shadow may trail the call by (10 s of 20 ms audio) before it skips
_SILENCE_DB = -100.0


def level_db(pcm: bytes) -> float:
    """RMS level of int16 PCM in dBFS (-100 for silence)."""
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype=np.int16).astype(np.float32)
    if samples.size == 0:
        return _SILENCE_DB
    rms = float(np.sqrt(np.mean(samples**2)))
    return round(20 * math.log10(rms / 32768), 1) if rms > 0 else _SILENCE_DB


class ShadowLog:
    """One call's would-be decisions and figures. Pure: the caller passes the times."""

    def __init__(self, params: BargeInParams, *, keep_events: bool = False, gate: bool = False):
        self.core = BargeInCore(params)
        self.params = params
        # Every event the core was given (with words): only for tests that replay it.
        self.events = EventLog() if keep_events else None
        self.actions: list[dict[str, Any]] = []  # what it would have done, and the speech spans
        self.counts = {"pause": 0, "resume": 0, "commit": 0}
        # The caller-voice gate's verdicts on the sounds that would have paused Annie (gate on).
        self.gate_counts: dict[str, int] | None = {v.value: 0 for v in Verdict} if gate else None
        self.started_at: float | None = None
        self.annie_s = 0.0  # how long Annie spoke
        self.caller_over_annie_s = 0.0  # the caller's voice while Annie spoke
        self._annie_since: float | None = None
        self._voice_since: float | None = None
        self._paused_at: float | None = None
        self._cut_off = False  # a would-be commit stopped Annie's reply (she goes on in half-duplex)
        self.mic_db = _SILENCE_DB
        self.ref_db = _SILENCE_DB

    # --- events ----------------------------------------------------------------------------

    def bot_started(self, now: float, stt_in_flight: bool = False) -> None:
        self._start(now)
        self._cut_off = False
        if self._annie_since is None:
            self._annie_since = now
            self._span("annie", now)
        self._note("bot_started", now, **({"in_flight": True} if stt_in_flight else {}))
        self._apply(now, self.core.bot_started(now, caller_audio_in_flight=stt_in_flight))

    def bot_stopped(self, now: float) -> None:
        self._start(now)
        if self._annie_since is not None:
            self.annie_s += now - self._annie_since
            self._annie_since = None
            self._span("annie_end", now)
        self._close_voice(now)
        if self._cut_off:  # the decision was told at the would-be commit
            self._cut_off = False
            return
        self._note("bot_stopped", now)
        self._apply(now, self.core.bot_stopped(now))

    def voice(self, now: float, started: bool) -> None:
        self._start(now)
        if started:
            self._voice_since = now
            self._span("voice", now)
            self._note("voice_started", now)
            self._apply(now, self.core.voice_started(now))
        else:
            self._close_voice(now)
            self._voice_since = None
            self._span("voice_end", now)
            self._note("voice_stopped", now)
            self._apply(now, self.core.voice_stopped(now))

    def words(self, now: float, text: str, *, final: bool, echo: set[str]) -> None:
        self._note("words", now, text=text, final=final, echo=sorted(echo))
        self._apply(now, self.core.words(now, text, final=final, annies_words=echo))

    def gate(self, now: float, scored: Scored) -> None:
        """The caller-voice gate's verdict on a sound while Annie spoke: recorded with its scores
        (numbers only), and given to the decision as barge-in would give it."""
        self._start(now)
        if self.gate_counts is not None:
            self.gate_counts[scored.verdict.value] += 1
        if len(self.actions) < MAX_RECORDS:
            self.actions.append({"t": self._t(now), "gate": scored.verdict.value,
                                 **{k: round(v, 3) for k, v in (("caller", scored.caller), ("annie", scored.annie))
                                    if v is not None}})
        not_caller = scored.verdict is Verdict.NOT_CALLER
        self._note("verdict", now, not_caller=not_caller)
        self._apply(now, self.core.voice_verdict(now, not_caller))

    def tick(self, now: float) -> None:
        if self.core.wake_at is not None and now >= self.core.wake_at:
            self._note("tick", now)
            self._apply(now, self.core.tick(now))

    # --- what the decision would have done -------------------------------------------------------

    def _apply(self, now: float, out: Outcome) -> None:
        for action in out.actions:
            if isinstance(action, Pause):
                self._paused_at = now
                self._record("pause", now)
                self._note("paused", now)
                self._apply(now, self.core.playback_paused(now))  # a pause would be at once
            elif isinstance(action, Resume):
                self._record("resume", now)
                self._paused_at = None
            elif isinstance(action, Commit):
                self._record("commit", now, why=action.why)
                self._paused_at = None
                # Barge-in would start the caller's turn here and Annie would stop: the decision
                # goes on as if she had (what she goes on saying in half-duplex is not paused on).
                self._note("turn_started", now)
                self.core.turn_started(now)
                self._cut_off = True
                self._note("bot_stopped", now)
                self._apply(now, self.core.bot_stopped(now))
            elif isinstance(action, StartTurn):
                self._note("turn_started", now)
                self.core.turn_started(now)
            if self.events is not None and type(action) in ACTION_NAMES:
                self.events.action(action, now)

    def _t(self, now: float) -> float:
        return round(now - (now if self.started_at is None else self.started_at), 3)

    def _span(self, what: str, now: float) -> None:
        if len(self.actions) < MAX_RECORDS:
            self.actions.append({"t": self._t(now), "span": what})

    def _record(self, action: str, now: float, **extra: Any) -> None:
        rec = {"t": self._t(now), "a": action, "mic_db": self.mic_db, "ref_db": self.ref_db}
        if action != "pause" and self._paused_at is not None:
            rec["after_s"] = round(now - self._paused_at, 3)
        if len(self.actions) < MAX_RECORDS:
            self.actions.append({**rec, **extra})
        self.counts[action] += 1

    def _note(self, name: str, now: float, **data: Any) -> None:
        if self.events is not None:
            self.events.event(name, now, **data)

    def _start(self, now: float) -> None:
        if self.started_at is None:
            self.started_at = now

    def _close_voice(self, now: float) -> None:
        if self._voice_since is not None and self._annie_since is not None:
            self.caller_over_annie_s += now - max(self._voice_since, self._annie_since)
            self._voice_since = now

    # --- the call's figures ------------------------------------------------------------------

    def summary(self, now: float) -> dict[str, Any]:
        annie_s = self.annie_s + (now - self._annie_since if self._annie_since is not None else 0.0)
        count = self.counts
        minutes = annie_s / 60
        summary = {
            "annie_speech_min": round(minutes, 2),
            "would_pause": count["pause"],
            "would_resume": count["resume"],
            "would_commit": count["commit"],
            "resumed_pauses_per_min": round(count["resume"] / minutes, 2) if minutes > 0 else None,
            "caller_over_annie_s": round(self.caller_over_annie_s, 1),
        }
        if self.gate_counts is not None:
            summary.update({f"gate_{verdict}": n for verdict, n in self.gate_counts.items()})
        return summary

    def records(self, now: float) -> list[dict[str, Any]]:
        header = {"version": RECORD_VERSION, "kind": "shadow-call", "window_s": self.params.window_s,
                  "resume_quiet_s": self.params.resume_quiet_s}
        return [header, *self.actions, {"summary": self.summary(now)}]


class ShadowFiles:
    """Where the records of the calls go: one JSON-lines file a call, the last ``keep`` kept."""

    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory)
        self.keep = keep

    def write(self, records: list[dict[str, Any]]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"shadow-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6:06d}.jsonl"
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        for old in sorted(self.directory.glob("shadow-*.jsonl"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path


class ShadowWords:
    """The shadow's own transcription on the streaming engine, while Annie speaks.

    In a half-duplex call the STT hears nothing while Annie speaks (the caller is muted), so the
    shadow runs a stream of its own on the same engine (one more stream on a GPU built for a
    thousand): from the shadow VAD's start, with ``preroll_s`` of audio from before it, to its
    stop, which finalizes. The engine is synchronous; its calls run on one worker thread.
    """

    def __init__(self, engine: Any, sample_rate: int, preroll_s: float = 0.5, frame_s: float = 0.02):
        self._engine = engine
        self._stream = engine.new_stream(sample_rate=sample_rate)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow-asr")
        self._preroll: deque[bytes] = deque(maxlen=max(1, round(preroll_s / frame_s)))
        self.active = False

    async def _run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> str | None:
        self.active = True
        await self._run(self._stream.reset)
        preroll, self._preroll = b"".join(self._preroll), deque(maxlen=self._preroll.maxlen)
        return await self._run(self._engine.accept, self._stream, preroll) if preroll else None

    async def audio(self, pcm: bytes) -> str | None:
        if not self.active:
            self._preroll.append(pcm)
            return None
        return await self._run(self._engine.accept, self._stream, pcm)

    async def stop(self) -> str:
        self.active = False
        return await self._run(self._engine.finalize, self._stream)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Beside:
    """Jobs run beside the call (the caller-voice gate's embeddings): the call never waits for
    them, and they are cancelled when it ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def run(self, job: Coroutine[Any, Any, None] | None) -> None:
        if job is None:
            return
        task = asyncio.get_running_loop().create_task(self._guarded(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guarded(job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except Exception as e:  # noqa: BLE001 - the shadow must never hurt the call
            logger.warning(f"barge-in shadow: the caller-voice gate failed: {type(e).__name__}: {e}")

    async def settled(self) -> None:
        """Wait for the jobs started so far (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class ShadowReference(FrameProcessor):
    """After the output transport (it passes each chunk on as it writes it to the sink): notes the
    level of what Annie is playing (what the line's echo would carry), and with the caller-voice
    gate enrols her voice. Before the output it would see the TTS's audio seconds ahead of play."""

    def __init__(self, log: ShadowLog, annie: AnnieVoice | None = None):
        super().__init__()
        self._log = log
        self._annie = annie
        self._beside = _Beside()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._log.ref_db = level_db(frame.audio)
            if self._annie is not None:
                self._beside.run(self._annie.heard(frame.audio, frame.sample_rate))

    async def cleanup(self):
        self._beside.cancel()
        await super().cleanup()


class ShadowTap(FrameProcessor):
    """Between the STT and the user aggregator: the VAD and the decision as if barge-in were on.

    Every frame goes on first, unchanged; the tap then looks at it on a task of its own, in
    order, at most ``FOLLOW_BEHIND_MAX`` frames behind (past that it skips, counts and warns once).
    ``echo_words`` gives the words Annie is saying (the playback's echo guard); ``gate``, the
    caller-voice gate's worker, makes the gate judge on this tap's VAD. At the end of the call the
    records are written and the summary logged; ``on_summary`` gets it too (the status endpoint).
    """

    def __init__(
        self,
        log: ShadowLog,
        vad: VADAnalyzer,
        *,
        files: ShadowFiles | None = None,
        words: ShadowWords | None = None,
        echo_words: Callable[[], set[str]] = set,
        on_summary: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stt_in_flight: Callable[[], bool] = lambda: False,
        gate: GateWorker | None = None,
    ):
        super().__init__()
        self._log = log
        self._gate = gate
        # The caller-voice gate, on the shadow's own VAD; its embeddings run beside the call.
        self._judge = VoiceJudge(gate, self._gate_verdict) if gate is not None else None
        self.beside = _Beside()
        self._stt_in_flight = stt_in_flight
        self._vad = vad
        self._files = files
        self._words = words
        self._echo_words = echo_words
        self._on_summary = on_summary
        self._clock = clock
        self._vad_state = VADState.QUIET
        self._closed = False
        self._queue: asyncio.Queue[tuple[Frame, float, bool]] = asyncio.Queue(maxsize=FOLLOW_BEHIND_MAX)
        self._follower: asyncio.Task | None = None
        self.fell_behind = 0  # frames the shadow skipped, being too far behind the call

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, (EndFrame, CancelFrame)):
            await self.settled(timeout=1.0)  # what was heard before the end is in the records
            self.close()
            return
        if self._closed or not self._follows(frame, direction):
            return
        # The look comes after, on a task of its own: the call's frames never wait for the
        # shadow's VAD (a segmented STT cuts its segment where the VAD's frames reach it).
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        in_flight = self._stt_in_flight() if isinstance(frame, BotStartedSpeakingFrame) else False
        try:
            self._queue.put_nowait((frame, self._clock(), in_flight))
        except asyncio.QueueFull:
            self.fell_behind += 1
            if self.fell_behind == 1:
                logger.warning(f"{self}: the shadow fell {FOLLOW_BEHIND_MAX} frames behind the call; it skips "
                               "frames until it catches up (its figures for this call are incomplete)")

    @staticmethod
    def _follows(frame: Frame, direction: FrameDirection) -> bool:
        if isinstance(frame, InputAudioRawFrame):
            return True
        if isinstance(frame, (BotStartedSpeakingFrame, BotStoppedSpeakingFrame)):
            return direction == FrameDirection.UPSTREAM
        return isinstance(frame, (InterimTranscriptionFrame, TranscriptionFrame)) and direction == FrameDirection.DOWNSTREAM

    async def _follow(self) -> None:
        while True:
            frame, now, in_flight = await self._queue.get()
            try:
                await self._look(frame, now, in_flight)
            except Exception as e:  # noqa: BLE001 - the shadow must never hurt the call
                logger.warning(f"{self}: shadow failed on a frame: {type(e).__name__}: {e}")
            finally:
                self._queue.task_done()

    async def settled(self, timeout: float | None = None) -> None:
        """Until every frame given so far was looked at (and the gate's jobs are done)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
            await asyncio.wait_for(self.beside.settled(), timeout)
        except TimeoutError:
            logger.warning(f"{self}: the shadow had not caught up with the call at its end")

    async def _look(self, frame: Frame, now: float, in_flight: bool) -> None:
        log = self._log
        if isinstance(frame, InputAudioRawFrame):
            log.mic_db = level_db(frame.audio)
            await self._hear(frame.audio, now)
            if self._judge is not None and frame.sample_rate == GATE_RATE:
                self.beside.run(self._judge.audio(frame.audio))
            await self._transcribe(frame.audio)
            log.tick(self._clock())
        elif isinstance(frame, BotStartedSpeakingFrame):
            log.bot_started(now, in_flight)
            if self._judge is not None:
                self._judge.bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            log.bot_stopped(now)
            if self._judge is not None:
                self._judge.bot_speaking = False
        elif isinstance(frame, (InterimTranscriptionFrame, TranscriptionFrame)):
            final = not isinstance(frame, InterimTranscriptionFrame)
            log.words(now, frame.text, final=final, echo=self._echo_words())

    async def _gate_verdict(self, scored: Scored) -> None:
        self._log.gate(self._clock(), scored)

    async def _hear(self, audio: bytes, now: float) -> None:
        try:
            state = await self._vad.analyze_audio(audio)
        except Exception as e:  # noqa: BLE001 - the shadow must never hurt the call
            logger.warning(f"{self}: shadow VAD failed on a frame: {type(e).__name__}: {e}")
            return
        if state == self._vad_state or state in (VADState.STARTING, VADState.STOPPING):
            return
        self._vad_state = state
        if state in (VADState.SPEAKING, VADState.QUIET):
            started = state == VADState.SPEAKING
            self._log.voice(now, started=started)
            if self._judge is not None:
                if started:
                    # Not over a reply a would-be commit stopped: barge-in would not score it, and
                    # Annie's voice under it is no enrolment of the caller's.
                    if self._log.core.bot_speaking or not self._judge.bot_speaking:
                        self._judge.voice_started()
                else:
                    self.beside.run(self._judge.voice_stopped())
            if self._words is not None:
                if started and self._log.core.bot_speaking:
                    self._heard(await self._asr(self._words.start()), final=False)
                elif not started and self._words.active:
                    self._heard(await self._asr(self._words.stop()), final=True)

    async def _transcribe(self, audio: bytes) -> None:
        if self._words is not None:
            self._heard(await self._asr(self._words.audio(audio)), final=False)

    async def _asr(self, step) -> str | None:
        try:
            return await step
        except Exception as e:  # noqa: BLE001 - the shadow must never hurt the call
            logger.warning(f"{self}: shadow transcription failed: {type(e).__name__}: {e}")
            self._words = None
            return None

    def _heard(self, text: str | None, *, final: bool) -> None:
        if text and text.strip():
            logger.trace(f"{self}: shadow {'final' if final else 'partial'}: {text!r}")
            self._log.words(self._clock(), text, final=final, echo=self._echo_words())

    def close(self) -> None:
        """Write the call's records and log its summary (once)."""
        if self._closed:
            return
        self._closed = True
        if self._follower is not None:
            self._follower.cancel()
        self.beside.cancel()
        if self._gate is not None:
            self._gate.close()
        if self._words is not None:
            self._words.close()
        now = self._clock()
        summary = self._log.summary(now)
        logger.info("barge-in shadow, this call: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
        if self._on_summary is not None:
            self._on_summary(summary)
        if self._files is not None:
            try:
                path = self._files.write(self._log.records(now))
                logger.debug(f"{self}: records written to {path}")
            except OSError as e:
                logger.warning(f"{self}: could not write the shadow records to {self._files.directory}: {e}")

    async def cleanup(self):
        self.close()
        await super().cleanup()

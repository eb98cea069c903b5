"""Small real subclasses used where a test needs a component but not its wire protocol."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from pipecat.frames.frames import BotStartedSpeakingFrame, Frame, TranscriptionFrame, TTSAudioRawFrame, VADUserStoppedSpeakingFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService


class ToneTTSService(TTSService):
    """Synthesises each sentence as a 440 Hz tone, 60 ms per character, in 40 ms chunks.

    Audio arrives faster than real time, as from a real TTS server; the output transport paces it.
    """

    def __init__(self, *, ms_per_char: float = 60.0, first_audio_delay_s: float = 0.0, **kwargs):
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            sample_rate=24000,
            settings=TTSSettings(model=None, voice="tone", language=None),
            **kwargs,
        )
        self._ms_per_char = ms_per_char
        self._first_audio_delay_s = first_audio_delay_s
        self.requests: list[str] = []
        self.voiced: list[str] = []  # texts whose first audio was handed on
        self.produced = bytearray()  # every sample synthesised, in order

    def can_generate_metrics(self) -> bool:
        return True

    async def run_tts(self, text: str, context_id: str):
        self.requests.append(text)
        rate = self.sample_rate
        n = int(rate * self._ms_per_char / 1000 * max(1, len(text.strip())))
        t = np.arange(n) / rate
        pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes()
        self.produced += pcm
        step = int(rate * 0.04) * 2
        if self._first_audio_delay_s:
            await asyncio.sleep(self._first_audio_delay_s)
        await self.stop_ttfb_metrics()
        self.voiced.append(text)
        for i in range(0, len(pcm), step):
            yield TTSAudioRawFrame(audio=pcm[i : i + step], sample_rate=rate, num_channels=1, context_id=context_id)


class SlowFinalSTT(FrameProcessor):
    """A segmented STT slower than real time (Whisper on a busy CPU): each VAD stop hands it the
    utterance, and its final transcript, the next of ``finals``, comes ``delay_s`` later. Like the
    real services it says when it has audio in flight (``audio_in_flight``); with ``tells=False``
    it is one that cannot tell.

    ``after_annie_s``: a final other than the first comes no earlier than that long after Annie
    started speaking (a script whose late final must land in her answer, however slow the
    machine). ``sent_at`` holds when each final went out (monotonic)."""

    def __init__(self, finals: list[str], delay_s: float, *, tells: bool = True, after_annie_s: float | None = None):
        super().__init__()
        self._finals = list(finals)
        self._delay_s = delay_s
        self._tells = tells
        self._after_annie_s = after_annie_s
        self._annie_started = asyncio.Event()
        self._in_flight = 0
        self._given = 0
        self.sent_at: list[float] = []

    @property
    def audio_in_flight(self) -> bool:
        return self._tells and self._in_flight > 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, BotStartedSpeakingFrame):
            self._annie_started.set()
        if isinstance(frame, VADUserStoppedSpeakingFrame) and self._finals:
            self._in_flight += 1
            self._given += 1
            self.create_task(self._final_later(self._finals.pop(0), waits_for_annie=self._given > 1))

    async def _final_later(self, text: str, waits_for_annie: bool) -> None:
        try:
            await asyncio.sleep(self._delay_s)
            if waits_for_annie and self._after_annie_s is not None:
                await self._annie_started.wait()
                await asyncio.sleep(self._after_annie_s)
            self.sent_at.append(time.monotonic())
            await self.push_frame(TranscriptionFrame(text=text, user_id="caller", timestamp="", finalized=True))
        finally:
            self._in_flight -= 1


SPEAKER_DIM = 256


def unit_vector(seed: int, near: np.ndarray | None = None, cos: float | None = None) -> np.ndarray:
    """A random unit vector; with ``near`` and ``cos``, one at that cosine from ``near``."""
    v = np.random.default_rng(seed).standard_normal(SPEAKER_DIM)
    if near is None:
        return v / np.linalg.norm(v)
    v -= (v @ near) * near
    v /= np.linalg.norm(v)
    return cos * near + np.sqrt(1 - cos**2) * v


class ToneSpeakerEncoder:
    """Stands in for the speaker encoder where only the timing of the gate's taps is under test:
    a 200 Hz tone is the caller's voice, any other sound another voice (cosine 0.3 to hers), and
    under 0.3 s nothing (as the real encoder gives no embedding for a sound too short)."""

    CALLER = unit_vector(1)
    OTHER = unit_vector(5, near=CALLER, cos=0.3)

    def embed(self, pcm: np.ndarray) -> np.ndarray | None:
        if len(pcm) < 0.3 * 16000:
            return None
        spectrum = np.abs(np.fft.rfft(pcm.astype(np.float32)))
        return self.CALLER if abs(int(np.argmax(spectrum)) * 16000 / len(pcm) - 200) < 20 else self.OTHER


def tone_frames(tone_hz: float, seconds: float, rate: int = 16000) -> list[bytes]:
    """A tone as 20 ms frames of int16 PCM."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (8000 * np.sin(2 * np.pi * tone_hz * t)).astype(np.int16).tobytes()
    step = rate // 50 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]

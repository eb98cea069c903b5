"""Small real subclasses used where a test needs a component but not its wire protocol."""

from __future__ import annotations

import asyncio

import numpy as np
from pipecat.frames.frames import Frame, TranscriptionFrame, TTSAudioRawFrame, VADUserStoppedSpeakingFrame
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
    it is one that cannot tell."""

    def __init__(self, finals: list[str], delay_s: float, *, tells: bool = True):
        super().__init__()
        self._finals = list(finals)
        self._delay_s = delay_s
        self._tells = tells
        self._in_flight = 0

    @property
    def audio_in_flight(self) -> bool:
        return self._tells and self._in_flight > 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, VADUserStoppedSpeakingFrame) and self._finals:
            self._in_flight += 1
            self.create_task(self._final_later(self._finals.pop(0)))

    async def _final_later(self, text: str) -> None:
        try:
            await asyncio.sleep(self._delay_s)
            await self.push_frame(TranscriptionFrame(text=text, user_id="caller", timestamp="", finalized=True))
        finally:
            self._in_flight -= 1

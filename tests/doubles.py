"""Small real subclasses used where a test needs a component but not its wire protocol."""

from __future__ import annotations

import numpy as np
from pipecat.frames.frames import TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService


class ToneTTSService(TTSService):
    """Synthesises each sentence as a 440 Hz tone, 60 ms per character, in 40 ms chunks.

    Audio arrives faster than real time, as from a real TTS server; the output transport paces it.
    """

    def __init__(self, *, ms_per_char: float = 60.0, **kwargs):
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            sample_rate=24000,
            settings=TTSSettings(model=None, voice="tone", language=None),
            **kwargs,
        )
        self._ms_per_char = ms_per_char
        self.requests: list[str] = []
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
        await self.stop_ttfb_metrics()
        for i in range(0, len(pcm), step):
            yield TTSAudioRawFrame(audio=pcm[i : i + step], sample_rate=rate, num_channels=1, context_id=context_id)

"""A streaming STT stand-in shaped like the Nemotron engine, for benches on real caller audio.

It is told what the caller says (:meth:`ScriptedStreamingSTT.expect`: the text of each VAD
segment, in order) and hears the real audio frames and the real VAD: while the caller speaks it
sends a partial every ``chunk_s`` of audio (160 ms, the engine's chunk), ``partial_delay_s``
after the chunk (the engine's step), holding the words spoken so far (in proportion to the time
into the segment's voice); at each VAD stop it sends the segment's final ``final_delay_s`` later
(the engine's time to a final, ~20 ms on a GPU). Like the real service it says whether it has
audio in flight.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor


class ScriptedStreamingSTT(FrameProcessor):
    streams_partials = True

    def __init__(self, *, chunk_s: float = 0.16, partial_delay_s: float = 0.013, final_delay_s: float = 0.02):
        super().__init__()
        self._chunk_s = chunk_s
        self._partial_delay_s = partial_delay_s
        self._final_delay_s = final_delay_s
        self._segments: deque[tuple[str, float]] = deque()  # (text, seconds of voice)
        self._heard_s = 0.0  # audio heard since the segment's voice started
        self._chunks = 0
        self._speaking = False
        self._pending = 0

    def expect(self, text: str, voice_s: float) -> None:
        """The next VAD segment's words, and how long its voice lasts."""
        self._segments.append((text, voice_s))

    def clear(self) -> None:
        """Forget the segments still expected (a turn the VAD split or muted differently)."""
        self._segments.clear()

    @property
    def audio_in_flight(self) -> bool:
        return self._pending > 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            # The VAD starts ~start_secs into the voice: the words so far include that.
            self._speaking, self._heard_s, self._chunks = True, frame.start_secs, 0
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self._speaking:
            self._speaking = False
            if self._segments:
                text, _ = self._segments.popleft()
                self._later(self._final_delay_s, TranscriptionFrame(text=text, user_id="caller", timestamp="",
                                                                    finalized=True))
        elif isinstance(frame, InputAudioRawFrame) and self._speaking and self._segments:
            self._heard_s += len(frame.audio) / 2 / frame.sample_rate
            if self._heard_s >= (self._chunks + 1) * self._chunk_s:
                self._chunks += 1
                text, voice_s = self._segments[0]
                words = text.split()
                n = min(len(words), math.ceil(len(words) * self._heard_s / max(voice_s, 1e-3)))
                if n:
                    self._later(self._partial_delay_s, InterimTranscriptionFrame(
                        text=" ".join(words[:n]), user_id="caller", timestamp=""))

    def _later(self, delay_s: float, frame: Frame) -> None:
        self._pending += 1

        async def send() -> None:
            try:
                await asyncio.sleep(delay_s)
                await self.push_frame(frame)
            finally:
                self._pending -= 1

        self.create_task(send())

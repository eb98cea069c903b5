"""Keeps malformed caller audio from deafening the call.

Everything after the transport (Silero VAD, the STT) concatenates raw 16-bit PCM bytes. One
frame with an odd byte count would shift every later sample by one byte, turning the rest of
the call into noise; a frame at another sample rate or with two channels would be read at the
wrong speed. :class:`InputAudioGuard` sits right after the transport input and hands on only
whole mono 16-bit samples at the pipeline's input rate: a stray trailing byte is dropped (each
frame starts on a sample boundary, so carrying it into the next frame would misalign every
frame after it), other rates are resampled and stereo is mixed down. Healthy frames pass
untouched, without a copy.

Resampling streams (one resampler per run of frames at one rate, so the frames join without
clicks), and a streaming resampler holds back its filter delay, ~20 ms. When the rate changes, or
frames at the input rate return, the held-back tail is let out first and the resampler dropped:
the end of what was said at the other rate is not lost, and a later run at that rate does not
start with stale audio from this one.
"""

from __future__ import annotations

import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import Frame, InputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup


class InputAudioGuard(FrameProcessor):
    """Repairs ``InputAudioRawFrame``s (odd length, other rate, stereo); passes the rest on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._rate = 16000
        self._resampler: tuple[int, soxr.ResampleStream] | None = None
        self._warned: set[str] = set()

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self._rate = setup.audio_in_sample_rate

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            for repaired in self._repair(frame):
                await self.push_frame(repaired, direction)
            return
        await self.push_frame(frame, direction)

    def _repair(self, frame: InputAudioRawFrame) -> list[InputAudioRawFrame]:
        """The frames to pass on for ``frame``: usually one, none for a lone stray byte, and the
        tail of a finished run at another rate before the first frame after it."""
        channels = max(1, frame.num_channels)
        width = 2 * channels
        if len(frame.audio) % width == 0 and frame.sample_rate == self._rate and channels == 1:
            return [*self._end_resampling(frame), frame]
        whole = len(frame.audio) - len(frame.audio) % width
        if whole != len(frame.audio):
            self._warn("odd", f"{self}: an audio frame of {len(frame.audio)} bytes: dropping the stray bytes")
        if not whole:
            return []
        samples = np.frombuffer(frame.audio[:whole], dtype=np.int16)
        if channels > 1:
            self._warn("channels", f"{self}: {channels}-channel caller audio: mixing down to mono")
            samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
        if frame.sample_rate == self._rate:
            return [*self._end_resampling(frame), self._frame(samples, frame)]
        self._warn("rate", f"{self}: caller audio at {frame.sample_rate} Hz: resampling to {self._rate} Hz")
        switched = self._resampler is not None and self._resampler[0] != frame.sample_rate
        out = self._end_resampling(frame) if switched else []
        samples = self._resample(samples, frame.sample_rate)
        return [*out, self._frame(samples, frame)] if samples.size else out

    def _frame(self, samples: np.ndarray, like: InputAudioRawFrame) -> InputAudioRawFrame:
        repaired = InputAudioRawFrame(audio=samples.tobytes(), sample_rate=self._rate, num_channels=1)
        repaired.transport_source = like.transport_source
        return repaired

    def _resample(self, samples: np.ndarray, rate: int) -> np.ndarray:
        # One stream per run at a source rate, so consecutive frames join without edge clicks.
        if self._resampler is None:
            self._resampler = (rate, soxr.ResampleStream(rate, self._rate, 1, dtype="int16"))
        return self._resampler[1].resample_chunk(samples)

    def _end_resampling(self, like: InputAudioRawFrame) -> list[InputAudioRawFrame]:
        """Let out what the resampler still holds (its filter delay) and drop it; [] if none."""
        if self._resampler is None:
            return []
        _, stream = self._resampler
        self._resampler = None
        tail = stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        return [self._frame(tail, like)] if tail.size else []

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message)

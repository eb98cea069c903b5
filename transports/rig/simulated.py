"""A simulated phone line: a scripted caller in, a recording loudspeaker out.

It behaves like a sound card on both ends: the input produces a 20 ms frame of the caller's
audio (or line silence) every 20 ms of wall-clock time, and the output consumes audio at the
playback rate, keeping at most ``device_buffer_ms`` queued ahead of "now", as a real sink
does. Everything played is kept with its wall-clock time, so a test or the simulated call can
see exactly what the caller heard and when, and what was cut off by an interruption.

Used by ``python -m agent.phone --simulate`` and by tests; the PulseAudio transport is the real
thing (``transports.pulse``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from pipecat.frames.frames import (
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from transports.playback import PlaybackGate


class SimulatedPhoneParams(TransportParams):
    """Transport params plus the simulated devices' timing."""

    frame_ms: int = 20
    device_buffer_ms: int = 40
    max_recording_s: float = 3600.0


@dataclass
class PlayedChunk:
    """A piece of audio the simulated loudspeaker played, starting at ``t`` (monotonic s)."""

    t: float
    pcm: bytes
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate

    @property
    def rms(self) -> float:
        samples = np.frombuffer(self.pcm, dtype=np.int16).astype(np.float32)
        return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


class SimulatedCallerInput(BaseInputTransport):
    """Emits the caller's queued audio, else silence, one frame per ``frame_ms`` of real time."""

    _params: SimulatedPhoneParams

    def __init__(self, params: SimulatedPhoneParams):
        super().__init__(params)
        self._pending: deque[bytes] = deque()
        self._task: asyncio.Task | None = None
        self.heard: deque[tuple[float, bytes]] = deque(maxlen=int(params.max_recording_s * 1000 / params.frame_ms))

    def say(self, pcm16k: np.ndarray | bytes) -> float:
        """Queue caller audio (16 kHz mono int16); returns its duration in seconds."""
        data = pcm16k if isinstance(pcm16k, bytes) else np.asarray(pcm16k, dtype=np.int16).tobytes()
        self._pending.append(data)
        return len(data) / 2 / self.sample_rate if self.sample_rate else len(data) / 32000

    @property
    def speaking(self) -> bool:
        return bool(self._pending)

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._task is None:
            self._task = self.create_task(self._produce(), name="simulated-caller")

    async def stop(self, frame):
        await self._stop_producing()
        await super().stop(frame)

    async def cancel(self, frame):
        await self._stop_producing()
        await super().cancel(frame)

    async def _stop_producing(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await self.cancel_task(task)

    def _next_frame(self, nbytes: int) -> bytes:
        out = bytearray()
        while self._pending and len(out) < nbytes:
            head = self._pending[0]
            take = head[: nbytes - len(out)]
            out += take
            if len(take) == len(head):
                self._pending.popleft()
            else:
                self._pending[0] = head[len(take) :]
        return bytes(out) + bytes(nbytes - len(out))

    async def _produce(self) -> None:
        period = self._params.frame_ms / 1000
        nbytes = int(self.sample_rate * period) * 2
        deadline = time.monotonic()
        while True:
            pcm = self._next_frame(nbytes)
            self.heard.append((time.monotonic(), pcm))
            await self.push_audio_frame(InputAudioRawFrame(audio=pcm, sample_rate=self.sample_rate, num_channels=1))
            deadline += period
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))


class RecordingLoudspeakerOutput(BaseOutputTransport):
    """Plays audio in real time into a recording; an interruption drops the device buffer.

    Implements :class:`transports.playback.PausablePlayback`.
    """

    _params: SimulatedPhoneParams

    def __init__(self, params: SimulatedPhoneParams):
        super().__init__(params)
        self.played: deque[PlayedChunk] = deque()
        self.pauses: list[tuple[float, float | None]] = []  # (paused at, resumed at)
        self._clock = 0.0  # monotonic time at which the queued audio ends
        self._gate = PlaybackGate()

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if not await self._gate.wait_open():
            return True  # dropped by an interruption while paused
        self._play(frame.audio, frame.sample_rate)
        # A sound card blocks the writer until its buffer has room.
        ahead = self._clock - time.monotonic() - self._params.device_buffer_ms / 1000
        if ahead > 0:
            await asyncio.sleep(ahead)
        return True

    def _play(self, pcm: bytes, sample_rate: int) -> None:
        if not pcm:
            return
        now = time.monotonic()
        start = max(now, self._clock)
        chunk = PlayedChunk(t=start, pcm=pcm, sample_rate=sample_rate)
        self.played.append(chunk)
        # Keep the last ``max_recording_s`` of the call (chunks are 10-40 ms; count them by time).
        while start - self.played[0].t > self._params.max_recording_s:
            self.played.popleft()
        self._clock = start + chunk.duration

    async def process_frame(self, frame, direction: FrameDirection):
        if isinstance(frame, InterruptionFrame):
            self._gate.drop()
            if self.pauses and self.pauses[-1][1] is None:
                self.pauses[-1] = (self.pauses[-1][0], time.monotonic())
        elif isinstance(frame, TTSTextFrame):
            self._gate.note_spoken(frame.text)
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            self.flush_playback()

    def flush_playback(self) -> bytes:
        """Drop what the device still had queued: the caller hears nothing after now.

        Returns the dropped (unplayed) audio.
        """
        now = time.monotonic()
        kept: deque[PlayedChunk] = deque()
        unplayed = bytearray()
        for chunk in self.played:
            if chunk.t >= now:
                unplayed += chunk.pcm
                continue
            if chunk.t + chunk.duration > now:
                samples = int((now - chunk.t) * chunk.sample_rate)
                unplayed += chunk.pcm[samples * 2 :]
                chunk = PlayedChunk(chunk.t, chunk.pcm[: samples * 2], chunk.sample_rate)
            kept.append(chunk)
        self.played = kept
        self._clock = min(self._clock, now)
        return bytes(unplayed)

    # -- PausablePlayback ------------------------------------------------------------------
    async def pause_playback(self) -> None:
        if not self._gate.paused:
            self._gate.close(self.flush_playback())
            self.pauses.append((time.monotonic(), None))

    async def resume_playback(self, backup_ms: int = 0) -> None:
        if not self._gate.paused:
            return
        rate = self.sample_rate
        replay = self._last_played(int(rate * backup_ms / 1000) * 2) if backup_ms else b""
        self._play(replay + self._gate.open(), rate)
        self.pauses[-1] = (self.pauses[-1][0], time.monotonic())

    def recent_bot_words(self) -> set[str]:
        return set(self._gate.spoken_words)

    def _last_played(self, nbytes: int) -> bytes:
        tail = bytearray()
        for chunk in reversed(self.played):
            tail[:0] = chunk.pcm
            if len(tail) >= nbytes:
                break
        return bytes(tail[-nbytes:]) if nbytes else b""

    def audible_until(self, threshold_rms: float = 200.0) -> float | None:
        """Wall-clock end of the last chunk louder than ``threshold_rms``."""
        for chunk in reversed(self.played):
            if chunk.rms > threshold_rms:
                return chunk.t + chunk.duration
        return None

    def audio(self) -> np.ndarray:
        """Everything played, concatenated (int16)."""
        if not self.played:
            return np.zeros(0, dtype=np.int16)
        return np.frombuffer(b"".join(c.pcm for c in self.played), dtype=np.int16)


class SimulatedPhoneTransport(BaseTransport):
    """A simulated phone: ``say()`` speaks as the caller, ``output_processor.played`` is heard."""

    def __init__(self, params: SimulatedPhoneParams | None = None):
        super().__init__()
        self._params = params or SimulatedPhoneParams(
            audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=16000
        )
        self._input: SimulatedCallerInput | None = None
        self._output: RecordingLoudspeakerOutput | None = None

    def input(self) -> FrameProcessor:
        if self._input is None:
            self._input = SimulatedCallerInput(self._params)
        return self._input

    def output(self) -> FrameProcessor:
        if self._output is None:
            self._output = RecordingLoudspeakerOutput(self._params)
        return self._output

    @property
    def caller(self) -> SimulatedCallerInput:
        return self.input()  # type: ignore[return-value]

    @property
    def loudspeaker(self) -> RecordingLoudspeakerOutput:
        return self.output()  # type: ignore[return-value]

    def say(self, pcm16k: np.ndarray | bytes) -> float:
        return self.caller.say(pcm16k)

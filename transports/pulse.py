"""PulseAudio transport: the caller's (echo-cancelled) mic in, Annie's voice out.

Shaped like pipecat's ``LocalAudioTransport``: a params subclass, an input processor fed by a
capture thread, an output processor whose blocking writes run on one worker thread, and a facade.
What it adds for a phone call:

- **Pinned devices.** It listens to one named source (``PULSE_SOURCE``, default
  ``echo_cancel_source``) and plays to one named sink (``PULSE_SINK``). When either disappears
  (the phone's Bluetooth link drops, the server restarts) it logs once, passes no audio, and
  reattaches when the device is back; it never follows PulseAudio's fallback to another device.
- **A small playback buffer, flushed on interruption.** PulseAudio keeps only
  ``audio_out_buffer_ms`` of our audio queued, and an ``InterruptionFrame`` drops even that, so
  Annie stops at the sink within a few tens of milliseconds instead of finishing her sentence.
- **Clear start-up errors.** No server, or no such source or sink, raises
  :class:`~processors.errors.SetupError` naming ``PULSE_SOURCE``/``PULSE_SINK``/``PULSE_SERVER``.

- **It survives the server.** When PulseAudio (or PipeWire, or the Bluetooth link) restarts, both
  directions log one warning, retry with a bounded backoff for as long as the call lasts, and
  reattach; a read or write on the dead connection fails instead of hanging.

Libraries: :mod:`transports._pulse_stream` carries the audio (libpulse's asynchronous API over
ctypes; ``pa_simple`` deadlocks when the server dies mid-read) and ``pulsectl`` (the maintained
libpulse binding) answers "does this device exist, and is my stream still on it";
``pulsectl-asyncio`` would add nothing here because every call already runs off the event loop.
See :mod:`transports._pulse_io`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.utils.utils import obj_id
from pydantic import Field

from transports._pulse_io import PinnedStream, StreamSpec, check_device
from transports.aec import Aec3Canceller, EchoReference
from transports.playback import PlaybackGate

# While the source is away, how long the capture thread sleeps between looks (it also wakes on
# any device event, so reattaching is quicker than this).
_DETACHED_POLL_S = 0.25
# The longest the capture thread waits for one block before it looks at the stop flag and the
# device again (a suspended or silent-by-absence source delivers nothing at all).
_READ_TIMEOUT_S = 0.5

T = TypeVar("T")


class PulseAudioParams(TransportParams):
    """Transport parameters: pipecat's, plus the PulseAudio devices and buffer sizes.

    Parameters:
        source: Source to capture (``PULSE_SOURCE``), normally the echo-cancelled mic.
        sink: Sink to play to (``PULSE_SINK``).
        server: PulseAudio server string (``unix:/path/native``); None uses libpulse's default
            (``PULSE_SERVER``, else the user's session daemon).
        audio_in_block_ms: Duration of each captured frame.
        audio_out_buffer_ms: Audio PulseAudio keeps queued for playback (its ``tlength``): the
            most that can still play after an interruption if flushing were off, and the
            margin against underruns.
        flush_on_interruption: Drop what PulseAudio still holds when an ``InterruptionFrame``
            arrives (off only to measure what it buys).
        audio_out_10ms_chunks: Size of each playback write, in 10 ms (pipecat's default is 4);
            also the granularity at which pipecat's own queue can be interrupted.
    """

    source: str = Field("echo_cancel_source", min_length=1)
    sink: str = Field("echo_cancel_sink", min_length=1)
    server: str | None = None
    audio_in_block_ms: int = Field(20, ge=10, le=20)
    audio_out_buffer_ms: int = Field(60, ge=20, le=500)
    flush_on_interruption: bool = True
    audio_out_10ms_chunks: int = 2


class PulseAudioInputTransport(BaseInputTransport):
    """Captures the named source on a thread and hands 16-bit frames to the event loop."""

    _params: PulseAudioParams

    def __init__(self, params: PulseAudioParams, echo_canceller: Aec3Canceller | None = None,
                 **kwargs: object) -> None:
        """Initialize the input; the device is checked in :meth:`setup`.

        Args:
            params: Transport parameters.
            echo_canceller: In-process canceller applied to every captured block (ECHO_CANCELLER=aec3).
            **kwargs: Passed to :class:`BaseInputTransport`.
        """
        super().__init__(params, **kwargs)
        self._echo_canceller = echo_canceller
        self._stream: PinnedStream | None = None
        self._thread: threading.Thread | None = None
        self._stop_capture = threading.Event()

    async def setup(self, setup: FrameProcessorSetup) -> None:
        """Check that the server answers and has the source.

        Raises:
            SetupError: No server, or no such source (names ``PULSE_SOURCE``).
        """
        await super().setup(setup)
        if self._params.audio_in_enabled:
            await asyncio.to_thread(check_device, self._params.server, "source", self._params.source)

    async def start(self, frame: StartFrame) -> None:
        """Start capturing."""
        await super().start(frame)
        if self._params.audio_in_enabled and self._thread is None:
            block_bytes = self._block_frames * self._params.audio_in_channels * 2
            spec = StreamSpec(
                kind="source",
                device=self._params.source,
                sample_rate=self.sample_rate,
                channels=self._params.audio_in_channels,
                server=self._params.server,
                fragsize=block_bytes,
                # Past half a second behind, old audio is worth less than being current.
                maxlength=block_bytes * (500 // self._params.audio_in_block_ms),
            )
            self._stream = PinnedStream(spec, str(self))
            # One stop flag per thread: a thread given up on at stop must not run on after a restart.
            self._stop_capture = threading.Event()
            self._thread = threading.Thread(
                target=self._capture,
                args=(self._stream, block_bytes, self.get_event_loop(), self._stop_capture),
                name=f"{self}-capture", daemon=True,
            )
            self._thread.start()
        await self.set_transport_ready(frame)

    async def stop(self, frame: EndFrame) -> None:
        """Stop capturing, then the base input."""
        await self._stop_thread()
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame) -> None:
        """Stop capturing, then the base input."""
        await self._stop_thread()
        await super().cancel(frame)

    async def cleanup(self) -> None:
        """Release everything; safe after stop or cancel."""
        await super().cleanup()
        await self._stop_thread()

    @property
    def _block_frames(self) -> int:
        return self.sample_rate * self._params.audio_in_block_ms // 1000

    async def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop_capture.set()
        # The thread owns the stream and closes it itself: freeing it here, during a read, would
        # crash libpulse. A read, a detached poll or a reconnection attempt is the most we wait
        # for (each bounded); past that the thread is left to end on its own, with its own flag.
        await asyncio.to_thread(thread.join, 2.0)
        if thread.is_alive():
            logger.warning(f"{self}: capture thread did not stop within 2 s; leaving it to end by itself")

    def _capture(
        self, stream: PinnedStream, block_bytes: int, loop: asyncio.AbstractEventLoop, stop: threading.Event
    ) -> None:
        """Capture thread: read blocks, hand them over; wait (never spin) while detached."""
        try:
            while not stop.is_set():
                if not stream.is_open and not stream.try_open():
                    stream.wait_for_change(_DETACHED_POLL_S)
                    continue
                audio = stream.read(block_bytes, _READ_TIMEOUT_S)
                if audio is None:
                    continue
                if self._echo_canceller is not None:  # on this thread: never on the event loop
                    audio = self._echo_canceller.process(audio)
                frame = InputAudioRawFrame(
                    audio=audio,
                    sample_rate=self.sample_rate,
                    num_channels=self._params.audio_in_channels,
                )
                asyncio.run_coroutine_threadsafe(self.push_audio_frame(frame), loop)
        except RuntimeError as e:
            # The event loop closed under us (process shutting down): nothing left to feed.
            logger.debug(f"{self}: capture ended ({e})")
        finally:
            stream.close()


class PulseAudioOutputTransport(BaseOutputTransport):
    """Plays to the named sink; blocking writes and flushes share one worker thread.

    Implements :class:`transports.playback.PausablePlayback`: a pause flushes PulseAudio and
    keeps what it had not played yet (its latency's worth of the last writes), a resume writes
    that first, an interruption drops it.
    """

    _params: PulseAudioParams

    def __init__(self, params: PulseAudioParams, echo_reference: EchoReference | None = None,
                 **kwargs: object) -> None:
        """Initialize the output; the device is checked and opened in :meth:`setup`.

        Args:
            params: Transport parameters.
            echo_reference: Told every chunk written and every flush (the canceller's reference).
            **kwargs: Passed to :class:`BaseOutputTransport`.
        """
        super().__init__(params, **kwargs)
        self._echo_reference = echo_reference
        self._stream: PinnedStream | None = None
        # Writes and flushes must not overlap (libpulse-simple is not thread-safe) and must stay
        # in order, so one thread does all of them.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pulse-out")
        # Interruptible audio chunked before the last interruption is stale: see write_audio_frame.
        self._stale_before_id = 0
        self._gate = PlaybackGate()
        self._tail = bytearray()  # the last audio written (enough to cover PulseAudio's buffer)
        self._tail_max = 0

    async def setup(self, setup: FrameProcessorSetup) -> None:
        """Check the server and sink, and open the playback stream.

        Raises:
            SetupError: No server, or no such sink (names ``PULSE_SINK``).
        """
        await super().setup(setup)
        if not self._params.audio_out_enabled:
            return
        await asyncio.to_thread(check_device, self._params.server, "sink", self._params.sink)
        bytes_per_ms = self.sample_rate * self._params.audio_out_channels * 2 // 1000
        tlength = bytes_per_ms * self._params.audio_out_buffer_ms
        spec = StreamSpec(
            kind="sink",
            device=self._params.sink,
            sample_rate=self.sample_rate,
            channels=self._params.audio_out_channels,
            server=self._params.server,
            tlength=tlength,
            # Start playing as soon as one write arrived, rather than waiting for a full buffer.
            prebuf=min(tlength, self.audio_chunk_size),
            minreq=bytes_per_ms * 10,
            maxlength=tlength * 2,
        )
        self._stream = PinnedStream(spec, str(self))
        self._tail_max = max(spec.maxlength, bytes_per_ms * 1000)
        await self._run_blocking(self._stream.try_open)

    async def start(self, frame: StartFrame) -> None:
        """Start the output."""
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def cleanup(self) -> None:
        """Close the stream on the worker thread, then stop it; safe to call twice."""
        try:
            await super().cleanup()
            stream, self._stream = self._stream, None
            if stream is not None:
                await self._run_blocking(stream.close)
        finally:
            self._executor.shutdown(wait=False)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Handle frames as pipecat does, then flush PulseAudio on an interruption."""
        if isinstance(frame, InterruptionFrame):
            self._stale_before_id = obj_id()
            self._gate.drop()
        elif isinstance(frame, TTSTextFrame):
            self._gate.note_spoken(frame.text)
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame) and self._params.flush_on_interruption:
            await self.flush_playback()

    async def flush_playback(self) -> None:
        """Drop the audio PulseAudio still holds for us: the sink goes silent now.

        Runs after the write in progress (same worker thread), so what that write queued is
        dropped too.
        """
        if self._stream is not None:
            await self._run_blocking(self._flush)
            logger.debug(f"{self}: playback flushed")

    def _flush(self) -> None:
        assert self._stream is not None
        self._stream.flush()
        self._note_flush()

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Write one chunk; returns once PulseAudio has room for it (this paces playback).

        Returns:
            Whether the audio went to the sink; False for stale audio and while detached.
        """
        # The base class keeps writing the chunk it had already taken off its queue when an
        # interruption came; that chunk is from before the interruption and must not play.
        if frame.interruptible and frame.id < self._stale_before_id:
            return False
        if not await self._gate.wait_open():
            return False  # an interruption came while playback was paused
        if self._stream is None:
            return False
        written = await self._run_blocking(self._write_and_remember, frame.audio)
        if not written:
            # No sink: keep real-time pace so the pipeline neither races ahead nor spins.
            frames = len(frame.audio) // (2 * frame.num_channels)
            await asyncio.sleep(frames / frame.sample_rate)
        return written

    def _write_and_remember(self, data: bytes) -> bool:
        assert self._stream is not None
        started = time.monotonic()
        written = self._stream.write(data)
        if written:
            self._tail += data
            del self._tail[: max(0, len(self._tail) - self._tail_max)]
            self._note_written(data, started)
        return written

    # -- the echo canceller's reference (ECHO_CANCELLER=aec3): what played, and when -------
    def _note_written(self, data: bytes, started: float) -> None:
        if self._echo_reference is not None:
            self._echo_reference.written(data, self.sample_rate, started)

    def _note_flush(self) -> None:
        if self._echo_reference is not None and self._stream is not None:
            # What the sink itself had taken before the flush still plays (its own latency).
            self._echo_reference.flushed(self._stream.latency_us() or 0)

    def _flush_keeping_unplayed(self) -> bytes:
        """Flush PulseAudio; return what it still held (from its latency), newest audio last."""
        assert self._stream is not None
        latency_us = self._stream.latency_us() or 0
        self._stream.flush()
        self._note_flush()
        frame_bytes = 2 * self._params.audio_out_channels
        unplayed = int(latency_us * self.sample_rate / 1_000_000) * frame_bytes
        unplayed = min(unplayed, len(self._tail))
        held = bytes(self._tail[len(self._tail) - unplayed :]) if unplayed else b""
        del self._tail[len(self._tail) - unplayed :]
        return held

    # -- PausablePlayback ------------------------------------------------------------------
    async def pause_playback(self) -> None:
        if self._gate.paused or self._stream is None:
            return
        self._gate.close(b"")
        self._gate.held = await self._run_blocking(self._flush_keeping_unplayed)
        logger.debug(f"{self}: playback paused ({len(self._gate.held) // 2} samples held)")

    async def resume_playback(self, backup_ms: int = 0) -> None:
        if not self._gate.paused:
            return
        frame_bytes = 2 * self._params.audio_out_channels
        backup = min(len(self._tail), int(self.sample_rate * backup_ms / 1000) * frame_bytes)
        replay = (bytes(self._tail[len(self._tail) - backup :]) if backup else b"") + self._gate.held
        # Queue the held audio on the writer thread before the waiting writer goes on.
        pending = None
        if replay and self._stream is not None:
            pending = self.get_event_loop().run_in_executor(self._executor, self._write_and_remember, replay)
        self._gate.open()
        if pending is not None:
            await pending
        logger.debug(f"{self}: playback resumed")

    def recent_bot_words(self) -> set[str]:
        return set(self._gate.spoken_words)

    async def _run_blocking(self, func: Callable[..., T], *args: object) -> T:
        return await self.get_event_loop().run_in_executor(self._executor, func, *args)


class PulseAudioTransport(BaseTransport):
    """PulseAudio input and output for one phone call."""

    def __init__(self, params: PulseAudioParams, echo_canceller: Aec3Canceller | None = None,
                 **kwargs: object) -> None:
        """Initialize the transport; nothing touches PulseAudio until the pipeline sets up.

        Args:
            params: Devices, sample rates and buffer sizes.
            echo_canceller: In-process canceller (ECHO_CANCELLER=aec3): the input cancels with it,
                the output feeds its reference. None: the source is cancelled already (or not).
            **kwargs: Passed to :class:`BaseTransport`.
        """
        super().__init__(**kwargs)
        self._params = params
        self.echo_canceller = echo_canceller
        self._input: PulseAudioInputTransport | None = None
        self._output: PulseAudioOutputTransport | None = None

    def check_devices(self) -> None:
        """Check, synchronously, that the server and the enabled devices exist (for start-up).

        Raises:
            SetupError: One sentence naming PULSE_SERVER, PULSE_SOURCE or PULSE_SINK.
        """
        if self._params.audio_in_enabled:
            check_device(self._params.server, "source", self._params.source)
        if self._params.audio_out_enabled:
            check_device(self._params.server, "sink", self._params.sink)

    #
    # BaseTransport
    #

    def input(self) -> FrameProcessor:
        """The input processor (created once)."""
        if self._input is None:
            self._input = PulseAudioInputTransport(self._params, self.echo_canceller, name=f"{self}#input")
        return self._input

    def output(self) -> FrameProcessor:
        """The output processor (created once)."""
        if self._output is None:
            reference = self.echo_canceller.reference if self.echo_canceller is not None else None
            self._output = PulseAudioOutputTransport(self._params, reference, name=f"{self}#output")
        return self._output


__all__ = [
    "PulseAudioInputTransport",
    "PulseAudioOutputTransport",
    "PulseAudioParams",
    "PulseAudioTransport",
]

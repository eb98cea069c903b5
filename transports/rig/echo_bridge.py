"""The rig's echo path as a phone line makes it: the earpiece's audio, through a line model, into the mic.

PulseAudio's ``module-loopback`` can only delay; a phone line also band-limits, distorts and
attenuates (:mod:`transports.rig.linemodel`). :class:`EchoBridge` reads the speaker's monitor in
10 ms blocks on its own thread, runs them through an :class:`~transports.rig.linemodel.EchoPath`,
adds the caller's room, and plays the result into the microphone's null sink.

The whole path's delay is the model's. The rig measures the bridge's own latency once at start
(a noise burst into the earpiece, cross-correlated with the mic: :meth:`EchoBridge.calibrate`)
and takes it off the model's delay line. Then every half second the bridge checks its playback
against the wall clock: an underrun (a starved thread: PulseAudio played silence in its stead,
so every later echo would come that much later) beyond :data:`DRIFT_TOLERANCE_MS` is taken back
from the delay line, and what the delay line cannot give back (a stall longer than the line's
delay: the bridge then reads only as fast as it plays, so the rest waits in the recording) is read
past. A line asking for less delay than the bridge's own (about 20-40 ms here) gets the bridge's,
with a warning.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from loguru import logger

from transports._pulse_stream import PulseStream, PulseStreamError
from transports.rig.linemodel import EchoPath, LineModel, to_int16

BLOCK_MS = 10
# Playback buffer of the bridge: a busy 2-core machine (load 7) starved a 40 ms one every few seconds.
PLAY_BUFFER_MS = 100
DRIFT_TOLERANCE_MS = 8.0
CHECK_EVERY_BLOCKS = 50
READ_TIMEOUT_S = 0.5


class EchoBridge:
    """A thread: ``source`` (the earpiece's monitor) -> line model -> ``sink`` (the mic)."""

    def __init__(self, server: str, source: str, sink: str, model: LineModel, *, rate: int = 16000,
                 room: np.ndarray | None = None) -> None:
        self.model = model
        self.rate = rate
        self._server, self._source, self._sink = server, source, sink
        self._block = rate * BLOCK_MS // 1000
        self._room = room if room is not None and len(room) else None
        self._room_pos = 0
        self.room_on = True
        # The path's own delay line is not used: the bridge holds the delay, less its own latency.
        self._path = EchoPath(model, rate, extra_delay_ms=model.echo_delay_ms) if model.has_echo else None
        self._target = int(round(model.echo_delay_ms * rate / 1000))
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: Exception | None = None
        self.corrections = 0  # drift corrections so far
        self._baseline: int | None = None  # least (wall clock - samples written), samples
        self._shift = 0  # samples to add to (or, negative, drop from) the delay line, set by calibrate
        self._suspect: int | None = None  # a lag seen at the last check, not yet taken back
        self._drain = 0  # recorded samples to read past (a lag longer than the delay line)
        self.drained = 0  # samples read past so far
        self._lock = threading.Lock()
        self._rec: PulseStream | None = None
        self._play: PulseStream | None = None

    def start(self) -> None:
        """Open both streams and start the thread; raises RuntimeError if PulseAudio refuses."""
        nbytes = self._block * 2
        try:
            self._rec = PulseStream(
                "record", sample_rate=self.rate, channels=1, server=self._server, device=self._source,
                app_name="annie-rig", stream_name="rig-line-echo-in", fragsize=nbytes, maxlength=nbytes * 100,
            )
            tlength = self.rate * PLAY_BUFFER_MS // 1000 * 2
            self._play = PulseStream(
                "playback", sample_rate=self.rate, channels=1, server=self._server, device=self._sink,
                app_name="annie-rig", stream_name="rig-line-echo-out",
                tlength=tlength, prebuf=nbytes, minreq=nbytes, maxlength=tlength * 2,
            )
        except PulseStreamError as e:
            if self._rec is not None:
                self._rec.close()
            raise RuntimeError(f"the line's echo path could not open {self._source} -> {self._sink}: {e}") from e
        # The model's delay line starts with the bridge's own latency taken off (corrected as it runs).
        self._held = np.zeros(0)
        self._thread = threading.Thread(target=self._run, name="rig-line-echo", daemon=True)
        self._thread.start()
        if not self._ready.wait(5.0):
            raise RuntimeError("the line's echo path did not start within 5 s")

    def stop(self) -> None:
        """Stop the thread (it closes the streams); safe to call twice."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=3)

    def settle(self, timeout_s: float = 3.0) -> None:
        """Wait until the recording has caught up with the earpiece (a fresh monitor starts late)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._rec.latency_us() > 30_000:
            time.sleep(0.05)
        time.sleep(2 * CHECK_EVERY_BLOCKS * BLOCK_MS / 1000)  # a baseline for the drift check

    def calibrate(self, measured_delay_ms: float) -> float:
        """Move the delay line so the whole path has the model's delay; returns the bridge's own latency (ms).

        Args:
            measured_delay_ms: The path's delay as measured now (earpiece to mic).
        """
        with self._lock:
            own = measured_delay_ms - (len(self._held) + self._shift) * 1000 / self.rate
            self._shift += int(round((self.model.echo_delay_ms - measured_delay_ms) * self.rate / 1000))
        if own > self.model.echo_delay_ms + DRIFT_TOLERANCE_MS:
            logger.warning(f"line {self.model.name!r}: echo delay {self.model.echo_delay_ms:.0f} ms is below the "
                           f"rig's own {own:.0f} ms; the echo comes {own:.0f} ms late")
        return own

    def wait_calibrated(self, timeout_s: float = 2.0) -> None:
        """Block until the thread has moved its delay line as :meth:`calibrate` asked."""
        deadline = time.monotonic() + timeout_s
        while self._shift and time.monotonic() < deadline:
            time.sleep(0.02)

    def _apply_shift(self, shift: int) -> None:
        if shift > 0:
            self._held = np.concatenate([np.zeros(shift), self._held])
        else:
            take = min(-shift, len(self._held))
            self._held = self._held[take:]
            # More than the delay line holds: the rest waits in the recording (the bridge read
            # nothing while it was starved, and since then reads only as fast as it plays), so it
            # is read past. Without this, a stall longer than the line's delay (the caller-voice
            # gate's encoder loading) left a 200 ms handset echo at 760 ms for the whole call.
            self._drain += -shift - take

    def _check_drift(self, lag_min: float) -> None:
        """``lag_min``: the least (wall clock - samples written) over the last check, in samples.

        Writes block while PulseAudio's buffer is full, so in steady state that least lag is
        constant; an underrun (silence PulseAudio played in our stead) raises it for good, and
        every later echo comes that much later. Take it back from the delay line.
        """
        with self._lock:
            shift, self._shift = self._shift, 0
        if shift:
            self._apply_shift(shift)
        if self._baseline is None or lag_min < self._baseline:
            self._baseline = int(lag_min)
            self._suspect = None
            return
        drift = int(lag_min) - self._baseline
        if drift <= DRIFT_TOLERANCE_MS * self.rate / 1000:
            self._suspect = None
            return
        # A thread starved for a whole check lags too, without any underrun, and catches up once it
        # runs again; an underrun's lag stays. So take it back only when the next check still has it.
        if self._suspect is None:
            self._suspect = drift
            return
        drift = min(drift, self._suspect)
        self._suspect = None
        self._apply_shift(-drift)
        self._baseline += drift
        self.corrections += 1
        logger.debug(f"rig line echo path: {drift * 1000 / self.rate:.0f} ms of underrun taken back")

    def _read_past_lag(self) -> None:
        """Read past the recording's backlog that the delay line could not take back, as far as it
        is there now (what is not there was not a backlog: forget it)."""
        while self._drain >= self._block:
            if self._rec.read(self._block * 2, timeout=0) is None:
                self._drain = 0
                return
            self._drain -= self._block
            self.drained += self._block

    def _room_block(self, n: int) -> np.ndarray:
        assert self._room is not None
        idx = (self._room_pos + np.arange(n)) % len(self._room)
        self._room_pos = (self._room_pos + n) % len(self._room)
        return self._room[idx].astype(np.float64) / 32768.0

    def _run(self) -> None:
        blocks, written, lag_min = 0, 0, float("inf")
        try:
            # Silence first, so the playback stream runs before any echo is due.
            self._play.write(bytes(self._block * 2 * 2))
            self._held = np.zeros(self._target)
            t0 = time.monotonic()
            self._ready.set()
            while not self._stop.is_set():
                data = self._rec.read(self._block * 2, timeout=READ_TIMEOUT_S)
                if data is None:  # nothing recorded (a stalled server): look at the stop flag again
                    continue
                x = np.frombuffer(data, dtype=np.int16).astype(np.float64) / 32768.0
                echo = self._path.process(x) if self._path is not None else np.zeros(len(x))
                self._held = np.concatenate([self._held, echo])
                out, self._held = self._held[: len(x)], self._held[len(x):]
                if len(out) < len(x):
                    out = np.concatenate([np.zeros(len(x) - len(out)), out])
                if self._room is not None and self.room_on:
                    out = out + self._room_block(len(out))
                self._play.write(to_int16(out).tobytes())
                written += len(out)
                self._read_past_lag()
                lag_min = min(lag_min, (time.monotonic() - t0) * self.rate - written)
                blocks += 1
                if blocks % CHECK_EVERY_BLOCKS == 0:
                    self._check_drift(lag_min)
                    lag_min = float("inf")
        except PulseStreamError as e:
            if not self._stop.is_set():
                self.error = e
                logger.warning(f"rig line echo path stopped: {e}")
        finally:
            self._ready.set()
            self._rec.close()
            self._play.close()

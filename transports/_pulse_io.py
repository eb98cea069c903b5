"""Blocking PulseAudio streams pinned to one named device, for the PulseAudio transport.

Two libraries, each for what it does well:

- :mod:`transports._pulse_stream` (ctypes over libpulse's asynchronous API) carries the audio:
  blocking reads and writes with explicit buffer attributes (``tlength``, ``prebuf``,
  ``fragsize``), and a flush to drop what the server still holds after an interruption. Unlike
  ``pa_simple`` it cannot deadlock when the server dies mid-read, and none of its waits is
  unbounded (see that module).
- ``pulsectl`` (ctypes over ``libpulse``, the maintained introspection binding) answers what a
  stream cannot: does the named device exist, and is our stream still attached to it.

The second question matters because PulseAudio does not drop a stream whose device disappears:
it moves it to the default device (and back once the device returns, if the stream asked for it
by name). A phone agent whose Bluetooth source vanished would then quietly listen to another
microphone or to the monitor of its own speaker, so :class:`PinnedStream` watches the server's
events and detaches (reading nothing, writing nothing) until its own device is back.

Everything here blocks: call it from one dedicated thread (capture) or from one single-thread
executor (playback), never from the event loop, and never from two threads at once.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import pulsectl
from loguru import logger

from processors.errors import SetupError
from transports._pulse_stream import PulseStream, PulseStreamError

DeviceKind = Literal["source", "sink"]

# While detached, how often a playback stream may try to reopen (each try costs a connection).
REOPEN_INTERVAL_S = 0.5
# Backoff between reconnection attempts while the server itself is away.
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0

_SETTING = {"source": "PULSE_SOURCE", "sink": "PULSE_SINK"}


@dataclass(frozen=True)
class StreamSpec:
    """What to open: direction, device, format (s16le) and buffer sizes in bytes."""

    kind: DeviceKind
    device: str
    sample_rate: int
    channels: int
    server: str | None = None
    # Playback: bytes PulseAudio keeps queued, bytes needed before it starts, refill granularity.
    tlength: int = -1
    prebuf: int = -1
    minreq: int = -1
    # Capture: bytes per delivered fragment.
    fragsize: int = -1
    # Hard cap on the server-side buffer; old audio is dropped beyond it (latency over history).
    maxlength: int = -1

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * 2


def _connect_control(server: str | None, client_name: str) -> pulsectl.Pulse:
    """Open a pulsectl connection without ever autospawning a daemon.

    No ``timeout``: pulsectl 24.12 then always waits the whole timeout, even on success. A
    missing or refusing server still fails at once.
    """
    pulse = pulsectl.Pulse(client_name, server=server, connect=False)
    try:
        pulse.connect(autospawn=False)
    except Exception:
        pulse.close()
        raise
    return pulse


def _device_names(pulse: pulsectl.Pulse, kind: DeviceKind) -> list[str]:
    devices = pulse.source_list() if kind == "source" else pulse.sink_list()
    return [d.name for d in devices]


def check_device(server: str | None, kind: DeviceKind, name: str) -> None:
    """Check at start-up that the server answers and has the named source or sink.

    Args:
        server: PulseAudio server string (``unix:/path/native``), or None for libpulse's default
            (``PULSE_SERVER``, else the user's session daemon).
        kind: ``"source"`` or ``"sink"``.
        name: The device name, e.g. ``echo_cancel_source``.

    Raises:
        SetupError: The server cannot be reached, or it has no such device; the message is one
            sentence naming the setting to fix.
    """
    where = server or os.environ.get("PULSE_SERVER") or "the default PulseAudio server"
    try:
        pulse = _connect_control(server, "annie-check")
    except (pulsectl.PulseError, pulsectl.PulseDisconnected) as e:
        raise SetupError(
            f"Cannot reach {where} to open {_SETTING[kind]}={name!r}: start PulseAudio, or set "
            f"PULSE_SERVER to its socket (unix:/run/user/UID/pulse/native) ({e})."
        ) from e
    try:
        names = _device_names(pulse, kind)
    finally:
        pulse.close()
    if name not in names:
        raise SetupError(
            f"Setting {_SETTING[kind]} is invalid (got {name!r}): {where} has no such {kind}; "
            f"its {kind}s are {', '.join(names) or 'none'}."
        )


class PinnedStream:
    """One PulseAudio stream that only ever reads from or writes to its named device.

    Losing the device or the server is not an error: the stream closes, logs once, and the owner
    calls :meth:`try_open` (or :meth:`wait_for_change` between tries) until it is back.
    """

    def __init__(self, spec: StreamSpec, owner: str) -> None:
        """Prepare the stream; nothing is opened until :meth:`try_open`.

        Args:
            spec: Device, format and buffer sizes.
            owner: Name used in log lines (the transport processor).
        """
        self._spec = spec
        self._owner = owner
        # A unique media.name lets us find our own stream among the server's streams.
        self._stream_name = f"annie-{spec.kind}-{uuid.uuid4().hex[:8]}"
        self._stream: PulseStream | None = None
        self._control: pulsectl.Pulse | None = None
        self._dirty = False
        self._lost_at: float | None = None
        self._last_try = 0.0
        self._backoff = BACKOFF_MIN_S

    def __str__(self) -> str:
        return f"{self._owner}[{self._spec.kind} {self._spec.device!r}]"

    @property
    def is_open(self) -> bool:
        """Whether the audio stream is attached to its device right now."""
        return self._stream is not None

    # Opening and losing

    def try_open(self) -> bool:
        """Open the stream if the server and the device are there; one attempt, no waiting.

        Returns:
            Whether the stream is open and attached to its device.
        """
        if self._stream is not None:
            return True
        self._last_try = time.monotonic()
        if not self._ensure_control() or not self._device_present():
            return False
        try:
            self._stream = self._open_audio()
        except PulseStreamError as e:
            self._note_lost(f"opening failed: {e}")
            return False
        if not self._stream_attached():
            self._close_audio()
            return False
        self._backoff = BACKOFF_MIN_S
        if self._lost_at is not None:
            outage = time.monotonic() - self._lost_at
            logger.info(f"{self}: reattached after {outage:.1f} s")
            self._lost_at = None
        else:
            logger.debug(f"{self}: opened ({self._spec.sample_rate} Hz)")
        return True

    def try_open_throttled(self) -> bool:
        """Like :meth:`try_open`, but at most once per ``REOPEN_INTERVAL_S`` while detached."""
        if self._stream is None and time.monotonic() - self._last_try < REOPEN_INTERVAL_S:
            return False
        return self.try_open()

    def wait_for_change(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when devices or streams change.

        While the server is unreachable this sleeps with a growing backoff instead, so a detached
        capture thread never spins.
        """
        if self._control is None:
            time.sleep(min(self._backoff, timeout))
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            return
        try:
            self._control.event_listen(timeout=timeout)
        except (pulsectl.PulseError, pulsectl.PulseDisconnected):
            self._drop_control()

    def _note_lost(self, reason: str) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            logger.warning(f"{self}: {reason}; will reattach when it is back")

    def _lose(self, reason: str) -> None:
        self._close_audio()
        # The control connection may have died with the server: start the next try afresh.
        self._drop_control()
        self._note_lost(reason)

    # Audio

    def read(self, num_bytes: int, timeout: float) -> bytes | None:
        """Read one block (blocking, about its duration, at most ``timeout``).

        Returns:
            The audio; None when none came within ``timeout`` or the stream was lost (then
            :attr:`is_open` is False: call :meth:`try_open`).
        """
        if self._stream is None:
            return None
        try:
            data = self._stream.read(num_bytes, timeout)
        except PulseStreamError as e:
            self._lose(f"reading failed ({e})")
            return None
        if not self._still_attached():
            # This block may hold audio from the device PulseAudio moved us to: drop it.
            self._lose(f"the {self._spec.kind} disappeared")
            return None
        return data

    def write(self, data: bytes) -> bool:
        """Queue audio for playback; blocks while PulseAudio's buffer (``tlength``) is full.

        Returns:
            Whether the audio reached our sink (False while detached).
        """
        if self._stream is None and not self.try_open_throttled():
            return False
        assert self._stream is not None
        if not self._still_attached():
            self._lose(f"the {self._spec.kind} disappeared")
            # One immediate, unthrottled attempt: after a server restart the sink is usually back
            # already, and an idle output only notices the restart at the first write of an answer.
            if not self.try_open():
                return False
            assert self._stream is not None
        try:
            self._stream.write(data)
        except PulseStreamError as e:
            self._lose(f"writing failed ({e})")
            return False
        return True

    def flush(self) -> None:
        """Drop the audio that PulseAudio still holds for this stream (playback: silence now)."""
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except PulseStreamError as e:
            self._lose(f"flushing failed ({e})")

    def latency_us(self) -> int | None:
        """PulseAudio's estimate of the audio queued between us and the device, in µs."""
        if self._stream is None:
            return None
        try:
            return self._stream.latency_us()
        except PulseStreamError:
            return None

    def close(self) -> None:
        """Close the audio stream and the control connection; safe to call twice."""
        self._close_audio()
        self._drop_control()

    # Internals

    def _open_audio(self) -> PulseStream:
        s = self._spec
        return PulseStream(
            "record" if s.kind == "source" else "playback",
            sample_rate=s.sample_rate,
            channels=s.channels,
            server=s.server,
            device=s.device,
            app_name="annie",
            stream_name=self._stream_name,
            maxlength=s.maxlength,
            tlength=s.tlength,
            prebuf=s.prebuf,
            minreq=s.minreq,
            fragsize=s.fragsize,
        )

    def _close_audio(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _ensure_control(self) -> bool:
        if self._control is not None:
            return True
        try:
            control = _connect_control(self._spec.server, f"annie-watch-{self._spec.kind}")
        except (pulsectl.PulseError, pulsectl.PulseDisconnected) as e:
            self._note_lost(f"PulseAudio server unreachable ({e})")
            return False
        facility = "source_output" if self._spec.kind == "source" else "sink_input"
        control.event_mask_set(self._spec.kind, facility, "server")
        control.event_callback_set(self._on_event)
        self._control = control
        self._dirty = True
        return True

    def _drop_control(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            control.close()

    def _on_event(self, _event: pulsectl.PulseEventInfo) -> None:
        # pulsectl forbids calls from inside the callback: note it and stop listening.
        self._dirty = True
        raise pulsectl.PulseLoopStop

    def _still_attached(self) -> bool:
        """Cheap check after each block: only asks the server after it announced a change."""
        if self._control is None:
            return self._ensure_control() and self._stream_attached()
        try:
            # A 1 ms poll: pulsectl treats a timeout of 0 as "wait forever".
            self._control.event_listen(timeout=0.001)
        except (pulsectl.PulseError, pulsectl.PulseDisconnected):
            self._drop_control()
            return False
        if not self._dirty:
            return True
        return self._stream_attached()

    def _device_present(self) -> bool:
        assert self._control is not None
        try:
            return self._spec.device in _device_names(self._control, self._spec.kind)
        except (pulsectl.PulseError, pulsectl.PulseDisconnected):
            self._drop_control()
            return False

    def _stream_attached(self) -> bool:
        """Ask the server whether our stream exists and sits on our named device."""
        if self._control is None:
            return False
        self._dirty = False
        try:
            if self._spec.kind == "source":
                device = self._control.get_source_by_name(self._spec.device)
                streams = self._control.source_output_list()
                on = [st.source for st in streams if st.name == self._stream_name]
            else:
                device = self._control.get_sink_by_name(self._spec.device)
                streams = self._control.sink_input_list()
                on = [st.sink for st in streams if st.name == self._stream_name]
        except pulsectl.PulseIndexError:
            return False
        except (pulsectl.PulseError, pulsectl.PulseDisconnected):
            self._drop_control()
            return False
        return on == [device.index]

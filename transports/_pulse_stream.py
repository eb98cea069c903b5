"""One PulseAudio audio stream over libpulse's asynchronous API (ctypes), that never deadlocks.

Why not ``pa_simple`` (and the ``pasimple`` binding over it): ``pa_simple_read`` keeps the part
of a server fragment it has not returned yet *peeked* between calls. With shared memory (the
default), that fragment is a block imported from the server, and a peeked block counts as in
use. When the server dies, libpulse's mainloop thread tears the connection down and waits, holding
the mainloop lock, until every imported block is released; ours is released only by the next
read or by ``pa_simple_free``, both of which need that lock. Both threads wait for ever: the
capture thread is stuck and the caller is never heard again (gdb on a stuck test shows
``pa_memimport_free -> pa_semaphore_wait`` in the mainloop thread, ``pa_simple_free ->
pa_threaded_mainloop_stop -> pa_mutex_lock`` in ours). Here every peek is copied and dropped
under the lock, so no block is ever held when the mainloop thread runs, and every wait has a
timeout, so a server that stops answering is an error, not a hang.

Everything here blocks (up to its timeout): call a stream from one thread at a time, never from
the event loop. Used by :mod:`transports._pulse_io` and by the test rig.
"""

from __future__ import annotations

import ctypes
import threading
import time
from contextlib import contextmanager
from functools import cache
from typing import Literal

from loguru import logger

Direction = Literal["record", "playback"]

# How long connecting (server, then stream) may take before it counts as failed.
CONNECT_TIMEOUT_S = 5.0
# A playback write or a flush that makes no progress for this long means the server is stuck.
STALL_TIMEOUT_S = 3.0
# Recorded audio lost (a hole, a reader a whole buffer behind) is logged at the first and then
# at most this often.
_LOST_LOG_S = 10.0

_PA_CONTEXT_NOAUTOSPAWN = 0x0001
_PA_CONTEXT_READY, _PA_CONTEXT_FAILED, _PA_CONTEXT_TERMINATED = 4, 5, 6
_PA_STREAM_READY, _PA_STREAM_FAILED, _PA_STREAM_TERMINATED = 2, 3, 4
# The flags pa_simple uses: timing kept current, buffer sizes taken as latency targets.
_PA_STREAM_FLAGS = 0x0002 | 0x0008 | 0x2000  # INTERPOLATE_TIMING | AUTO_TIMING_UPDATE | ADJUST_LATENCY
_PA_SAMPLE_S16LE = 3
_PA_SEEK_RELATIVE = 0
_PA_OPERATION_RUNNING = 0
_PA_ERR_NODATA = 16
_SIZE_MAX = ctypes.c_size_t(-1).value

_notify_cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_request_cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_success_cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)


class _Throttle:
    """True at the first call, then at most once every ``every_s`` seconds."""

    def __init__(self, every_s: float):
        self._every_s = every_s
        self._last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self._every_s:
            return False
        self._last = now
        return True


class PulseStreamError(Exception):
    """The stream could not be opened, or it failed (server gone, device gone, server stuck)."""


class _SampleSpec(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8)]


class _BufferAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("maxlength", "tlength", "prebuf", "minreq", "fragsize")]


@cache
def _libpulse() -> ctypes.CDLL:
    """libpulse with the prototypes used here (loaded once; ctypes releases the GIL in calls)."""
    try:
        lib = ctypes.CDLL("libpulse.so.0")
    except OSError as e:
        raise PulseStreamError(f"libpulse is not installed (apt-get install libpulse0): {e}") from e
    p, i, s, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
    prototypes = {
        "pa_threaded_mainloop_new": (p, []),
        "pa_threaded_mainloop_get_api": (p, [p]),
        "pa_threaded_mainloop_start": (i, [p]),
        "pa_threaded_mainloop_stop": (None, [p]),
        "pa_threaded_mainloop_free": (None, [p]),
        "pa_threaded_mainloop_lock": (None, [p]),
        "pa_threaded_mainloop_unlock": (None, [p]),
        "pa_proplist_new": (p, []),
        "pa_proplist_sets": (i, [p, s, s]),
        "pa_proplist_free": (None, [p]),
        "pa_context_new_with_proplist": (p, [p, s, p]),
        "pa_context_set_state_callback": (None, [p, _notify_cb, p]),
        "pa_context_connect": (i, [p, s, i, p]),
        "pa_context_get_state": (i, [p]),
        "pa_context_errno": (i, [p]),
        "pa_context_disconnect": (None, [p]),
        "pa_context_unref": (None, [p]),
        "pa_stream_new": (p, [p, s, ctypes.POINTER(_SampleSpec), p]),
        "pa_stream_set_state_callback": (None, [p, _notify_cb, p]),
        "pa_stream_set_read_callback": (None, [p, _request_cb, p]),
        "pa_stream_set_write_callback": (None, [p, _request_cb, p]),
        "pa_stream_set_latency_update_callback": (None, [p, _notify_cb, p]),
        "pa_stream_connect_record": (i, [p, s, ctypes.POINTER(_BufferAttr), i]),
        "pa_stream_connect_playback": (i, [p, s, ctypes.POINTER(_BufferAttr), i, p, p]),
        "pa_stream_get_state": (i, [p]),
        "pa_stream_peek": (i, [p, ctypes.POINTER(p), ctypes.POINTER(sz)]),
        "pa_stream_drop": (i, [p]),
        "pa_stream_writable_size": (sz, [p]),
        "pa_stream_readable_size": (sz, [p]),
        "pa_stream_write": (i, [p, p, sz, p, ctypes.c_int64, i]),
        "pa_stream_flush": (p, [p, _success_cb, p]),
        "pa_stream_drain": (p, [p, _success_cb, p]),
        "pa_stream_get_latency": (i, [p, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(i)]),
        "pa_stream_disconnect": (i, [p]),
        "pa_stream_unref": (None, [p]),
        "pa_operation_get_state": (i, [p]),
        "pa_operation_unref": (None, [p]),
        "pa_strerror": (s, [i]),
    }
    for name, (restype, argtypes) in prototypes.items():
        func = getattr(lib, name)
        func.restype, func.argtypes = restype, argtypes
    return lib


class PulseStream:
    """A connected record or playback stream of 16-bit PCM on one named device.

    It owns its connection (a libpulse context on a threaded mainloop), so closing it, or losing
    the server, affects nothing else. ``close()`` is safe to call twice and after a failure.
    """

    def __init__(
        self,
        direction: Direction,
        *,
        sample_rate: int,
        channels: int,
        server: str | None,
        device: str | None,
        app_name: str,
        stream_name: str,
        maxlength: int = -1,
        tlength: int = -1,
        prebuf: int = -1,
        minreq: int = -1,
        fragsize: int = -1,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """Connect to the server and open the stream (never starts a daemon).

        Args:
            direction: ``"record"`` or ``"playback"``.
            sample_rate: Samples per second.
            channels: Channels (interleaved).
            server: Server string (``unix:/path/native``); None for libpulse's default.
            device: Source or sink name; None for the server's default.
            app_name: The client's ``application.name``.
            stream_name: The stream's ``media.name`` (how the stream is found among the server's).
            maxlength, tlength, prebuf, minreq, fragsize: Buffer attributes in bytes (-1: the
                server's choice), as for ``pa_simple``.
            connect_timeout: Seconds for the connection and the stream to become ready.

        Raises:
            PulseStreamError: No server, no such device, refused, or not ready in time.
        """
        self._pa = _libpulse()
        self._direction = direction
        self._wake = threading.Event()  # set by every libpulse callback
        self._pending = bytearray()  # recorded audio taken from libpulse, not returned yet
        self.hole_bytes = 0  # recorded audio the server did not have (filled with silence)
        self.overruns = 0  # reads that found the reader a whole buffer behind (audio dropped)
        self._hole_said, self._overrun_said = _Throttle(_LOST_LOG_S), _Throttle(_LOST_LOG_S)
        self._maxlength = maxlength if direction == "record" else -1
        self._fragment = max(0, fragsize)
        # The callbacks must outlive every use by libpulse: kept here until close().
        self._on_notify = _notify_cb(lambda *_: self._wake.set())
        self._on_request = _request_cb(lambda *_: self._wake.set())
        self._on_success = _success_cb(lambda *_: self._wake.set())
        self._mainloop = self._context = self._stream = None
        try:
            self._connect(server, app_name, connect_timeout)
            self._open(direction, sample_rate, channels, device, stream_name,
                       _BufferAttr(maxlength, tlength, prebuf, minreq, fragsize), connect_timeout)
        except BaseException:
            self.close()
            raise

    # Audio

    def read(self, num_bytes: int, timeout: float) -> bytes | None:
        """Return exactly ``num_bytes`` of recorded audio, or None if it did not come in time.

        Raises:
            PulseStreamError: The stream or the connection failed.
        """
        deadline = time.monotonic() + timeout
        while len(self._pending) < num_bytes:
            self._wake.clear()
            with self._locked():
                self._check_alive()
                took = self._take_fragment()
            if took:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._wake.wait(remaining)
        data = bytes(self._pending[:num_bytes])
        del self._pending[:num_bytes]
        self._check_backlog()
        return data

    def _check_backlog(self) -> None:
        """A reader that falls a whole buffer (``maxlength``) behind loses the oldest audio: the
        server drops it and tells no one. Say so (at most every ``_LOST_LOG_S``)."""
        if self._maxlength <= 0:
            return
        with self._locked():
            waiting = self._pa.pa_stream_readable_size(self._stream)
        if waiting == _SIZE_MAX or waiting + len(self._pending) < self._maxlength - self._fragment:
            return
        self.overruns += 1
        if self._overrun_said.due():
            logger.warning(f"PulseAudio {self._direction} stream: the reader is a whole buffer ({self._maxlength} "
                           f"bytes) behind; the server drops the oldest recorded audio ({self.overruns} times so far)")

    def write(self, data: bytes) -> None:
        """Queue audio for playback; blocks while the server's buffer (``tlength``) is full.

        Raises:
            PulseStreamError: The stream failed, or the server took nothing for ``STALL_TIMEOUT_S``.
        """
        view = memoryview(data)
        while view:
            self._wake.clear()
            with self._locked():
                self._check_alive()
                room = self._pa.pa_stream_writable_size(self._stream)
                if room == _SIZE_MAX:
                    self._fail("writable size")
                n = min(room, len(view))
                if n:
                    buf = (ctypes.c_char * n).from_buffer_copy(view[:n])
                    if self._pa.pa_stream_write(self._stream, buf, n, None, 0, _PA_SEEK_RELATIVE) < 0:
                        self._fail("write")
                    view = view[n:]
                    continue
            if not self._wake.wait(STALL_TIMEOUT_S):
                raise PulseStreamError(f"the server took no audio for {STALL_TIMEOUT_S:.0f} s")

    def flush(self) -> None:
        """Drop what the server still holds for this stream (playback: silence now)."""
        self._pending.clear()
        self._run_operation("flush", self._pa.pa_stream_flush, STALL_TIMEOUT_S)

    def drain(self, timeout: float) -> None:
        """Block until everything written has been played."""
        self._run_operation("drain", self._pa.pa_stream_drain, timeout)

    def latency_us(self) -> int:
        """The server's estimate of the audio between us and the device, in microseconds.

        Raises:
            PulseStreamError: The stream failed, or no timing information came within a second.
        """
        usec, negative = ctypes.c_uint64(), ctypes.c_int()
        deadline = time.monotonic() + 1.0
        while True:
            self._wake.clear()
            with self._locked():
                self._check_alive()
                if self._pa.pa_stream_get_latency(self._stream, ctypes.byref(usec), ctypes.byref(negative)) >= 0:
                    return 0 if negative.value else int(usec.value)
                if self._pa.pa_context_errno(self._context) != _PA_ERR_NODATA:
                    self._fail("latency")
            if not self._wake.wait(max(0.0, deadline - time.monotonic())):
                raise PulseStreamError("no timing information from the server")

    def close(self) -> None:
        """Disconnect and free everything; safe to call twice, and after a failure."""
        mainloop = self._mainloop
        if mainloop is None:
            return
        pa = self._pa
        pa.pa_threaded_mainloop_stop(mainloop)  # joins libpulse's thread: no callback runs after
        if self._stream is not None:
            pa.pa_stream_unref(self._stream)
        if self._context is not None:
            pa.pa_context_disconnect(self._context)
            pa.pa_context_unref(self._context)
        pa.pa_threaded_mainloop_free(mainloop)
        self._mainloop = self._context = self._stream = None

    def __enter__(self) -> PulseStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals

    def _connect(self, server: str | None, app_name: str, timeout: float) -> None:
        pa = self._pa
        self._mainloop = pa.pa_threaded_mainloop_new()
        if not self._mainloop:
            raise PulseStreamError("cannot create a libpulse mainloop")
        proplist = pa.pa_proplist_new()
        try:
            self._context = pa.pa_context_new_with_proplist(
                pa.pa_threaded_mainloop_get_api(self._mainloop), app_name.encode(), proplist
            )
        finally:
            pa.pa_proplist_free(proplist)
        if not self._context:
            raise PulseStreamError("cannot create a libpulse context")
        pa.pa_context_set_state_callback(self._context, self._on_notify, None)
        with self._locked():
            if pa.pa_context_connect(self._context, server.encode() if server else None, _PA_CONTEXT_NOAUTOSPAWN, None) < 0:
                self._fail("connect")
            if pa.pa_threaded_mainloop_start(self._mainloop) < 0:
                raise PulseStreamError("cannot start the libpulse mainloop thread")
        self._wait_state("connecting", timeout, lambda: self._context_state(), _PA_CONTEXT_READY,
                         (_PA_CONTEXT_FAILED, _PA_CONTEXT_TERMINATED))

    def _open(
        self, direction: Direction, rate: int, channels: int, device: str | None, name: str,
        attr: _BufferAttr, timeout: float,
    ) -> None:
        pa = self._pa
        spec = _SampleSpec(_PA_SAMPLE_S16LE, rate, channels)
        dev = device.encode() if device else None
        with self._locked():
            self._stream = pa.pa_stream_new(self._context, name.encode(), ctypes.byref(spec), None)
            if not self._stream:
                self._fail("stream")
            pa.pa_stream_set_state_callback(self._stream, self._on_notify, None)
            pa.pa_stream_set_latency_update_callback(self._stream, self._on_notify, None)
            if direction == "record":
                pa.pa_stream_set_read_callback(self._stream, self._on_request, None)
                ok = pa.pa_stream_connect_record(self._stream, dev, ctypes.byref(attr), _PA_STREAM_FLAGS)
            else:
                pa.pa_stream_set_write_callback(self._stream, self._on_request, None)
                ok = pa.pa_stream_connect_playback(self._stream, dev, ctypes.byref(attr), _PA_STREAM_FLAGS, None, None)
            if ok < 0:
                self._fail("connecting the stream")
        self._wait_state("opening the stream", timeout, lambda: pa.pa_stream_get_state(self._stream),
                         _PA_STREAM_READY, (_PA_STREAM_FAILED, _PA_STREAM_TERMINATED))

    def _wait_state(self, what: str, timeout: float, state, ready: int, failed: tuple[int, ...]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._wake.clear()
            with self._locked():
                now = state()
                if now == ready:
                    return
                if now in failed:
                    self._fail(what)
            if not self._wake.wait(max(0.0, deadline - time.monotonic())):
                raise PulseStreamError(f"{what} timed out after {timeout:.0f} s")

    def _take_fragment(self) -> bool:
        """Move one fragment from libpulse into ``_pending`` (lock held). Whether there was one."""
        data, size = ctypes.c_void_p(), ctypes.c_size_t()
        if self._pa.pa_stream_peek(self._stream, ctypes.byref(data), ctypes.byref(size)) < 0:
            self._fail("read")
        if size.value == 0:
            return False
        if data.value:
            self._pending += ctypes.string_at(data.value, size.value)
        else:  # a hole in the recording: silence in its place keeps the timeline (pa_simple skips it)
            self._pending += bytes(size.value)
            self._hole(size.value)
        self._pa.pa_stream_drop(self._stream)
        return True

    def _hole(self, size: int) -> None:
        """Count a hole; say so (at most every ``_LOST_LOG_S``)."""
        self.hole_bytes += size
        if self._hole_said.due():
            logger.warning(f"PulseAudio {self._direction} stream: a hole of {size} bytes in the recording, filled "
                           f"with silence ({self.hole_bytes} bytes so far)")

    def _run_operation(self, what: str, start, timeout: float) -> None:
        self._wake.clear()
        with self._locked():
            self._check_alive()
            op = start(self._stream, self._on_success, None)
            if not op:
                self._fail(what)
        try:
            deadline = time.monotonic() + timeout
            while True:
                with self._locked():
                    self._check_alive()
                    if self._pa.pa_operation_get_state(op) != _PA_OPERATION_RUNNING:
                        return
                    self._wake.clear()
                if not self._wake.wait(max(0.0, deadline - time.monotonic())):
                    raise PulseStreamError(f"{what} did not finish within {timeout:.0f} s")
        finally:
            with self._locked():
                self._pa.pa_operation_unref(op)

    def _context_state(self) -> int:
        return self._pa.pa_context_get_state(self._context)

    def _check_alive(self) -> None:
        if self._context_state() != _PA_CONTEXT_READY or self._pa.pa_stream_get_state(self._stream) != _PA_STREAM_READY:
            self._fail("stream")

    def _fail(self, what: str) -> None:
        errno = self._pa.pa_context_errno(self._context) if self._context else 0
        reason = self._pa.pa_strerror(errno)
        raise PulseStreamError(f"{what} failed: {reason.decode() if reason else errno}")

    @contextmanager
    def _locked(self):
        self._pa.pa_threaded_mainloop_lock(self._mainloop)
        try:
            yield
        finally:
            self._pa.pa_threaded_mainloop_unlock(self._mainloop)

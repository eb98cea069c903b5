"""In-process echo cancellation: WebRTC AEC3 fed with exactly the samples Annie played.

``ECHO_CANCELLER=aec3``: the agent listens to the raw line (not PulseAudio's ``echo_cancel_source``,
whose module links the legacy webrtc canceller on Debian 12) and removes Annie's echo itself, with
the maintained AEC3 binding in ``livekit`` (``rtc.AudioProcessingModule``; stock AEC3, 10 ms int16
frames). Two halves, one per thread of the PulseAudio transport:

- :class:`EchoReference`: the playback side. The output's writer thread reports each chunk it
  wrote and when the write began (:meth:`EchoReference.written`), so the chunk lands on a
  wall-clock timeline at the moment it will be *played*: at once on an idle stream, else right
  after what PulseAudio still holds; a flush (interruption, pause)
  cuts everything not yet played off that timeline (:meth:`EchoReference.flushed`): what was
  dropped was never played, and a resume writes the held audio again as new chunks. Contiguous
  chunks stay sample-contiguous (the timeline re-anchors only across a gap in playback).
- :class:`Aec3Canceller`: the capture side. The capture thread hands it each block it read; it
  places the block on the same timeline (a sample count anchored on the earliest arrival seen),
  feeds AEC3 the reference for that time and the mic, 10 ms at a time, and returns the
  cancelled block. All of it runs on the capture thread, never on the event loop.

The rest of the echo's delay (the phone network's round trip, 150-400 ms) is AEC3's to find: its
delay estimator covers about half a second and needs no hint (a probe found 26-30 dB after 2 s
for echo at 30, 200 and 400 ms with a hint of 0 or of the true delay alike).

A line that brings no echo back at all is AEC3's worst case (it keeps suppressing the caller
whenever Annie speaks): :class:`~transports.echo_presence.EchoPresence` notices it after three
2 s windows of Annie's speech without an echo, and the mic then passes through until an echo
shows up again.

A reference that falls behind (a chunk reported after the mic already passed its time) or a
failing AEC3 call is logged once; the call goes on, with the mic passed through if need be.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from loguru import logger

from processors.errors import SetupError
from transports.echo_presence import ABSENT_WINDOWS, WINDOW_S, EchoPresence

FRAME_MS = 10
# A chunk written less than this after the end of what was queued before still joins it (the
# writer's timing jitter); a larger gap means the stream ran dry: a pause in playback.
CONTIGUOUS_TOLERANCE_S = 0.01
# Reference kept behind the newest capture position (the capture side reads what played then).
KEEP_S = 2.0
# The capture clock re-anchors when arrivals stayed this much later than its anchor for a while
# (the capture stream dropped audio, or reattached).
REANCHOR_S = 0.05
REANCHOR_WINDOW_BLOCKS = 100
# The mic's block at time T is cancelled with what played at T - REFERENCE_LAG_S: a chunk's
# report may come a little after the mic block of its first samples was read (the first chunk of
# a reply plays at once), and the echo of a phone line comes 100 ms or more after the play anyway.
REFERENCE_LAG_S = 0.02
# A reference chunk reported this much after the mic passed its start is worth a warning (once).
LATE_WARNING_S = 0.02


class EchoReference:
    """What Annie played, on a wall-clock sample timeline at the capture rate. Thread-safe."""

    def __init__(self, rate: int = 16000, clock=time.monotonic):
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: deque[tuple[int, np.ndarray]] = deque()  # (first sample index, int16)
        self._end: int | None = None  # index after the last sample scheduled
        self._resampler = None
        self._resampler_rate = 0
        self._consumed = 0  # the capture side has read the timeline up to here
        self.late_chunks = 0
        self._warned_late = False

    def _now_index(self) -> int:
        return int(round(self._clock() * self.rate))

    def written(self, pcm: bytes, sample_rate: int, write_started: float) -> None:
        """A chunk reached PulseAudio; ``write_started``: the monotonic time its write began.

        A chunk written while PulseAudio still holds earlier audio plays right after it (the
        timeline stays sample-contiguous). One written to an idle or flushed stream starts playing
        at once (the stream starts after one chunk), so it is placed at the time of its write.
        (PulseAudio's reported latency was tried as the anchor instead: it moved the reference by
        5-10 ms from one reply to the next on the rig, where the write time moved it by 1-4 ms.)
        """
        samples = np.frombuffer(pcm, dtype=np.int16)
        samples = self._resample(samples, sample_rate)
        if not len(samples):
            return
        start = int(round(write_started * self.rate))
        with self._lock:
            if self._end is not None and start < self._end + CONTIGUOUS_TOLERANCE_S * self.rate:
                start = self._end  # queued behind what was written before: keep the samples in step
            if start < self._consumed:
                self.late_chunks += 1
                if not self._warned_late and start < self._consumed - LATE_WARNING_S * self.rate:
                    self._warned_late = True
                    behind_ms = (self._consumed - start) * 1000 / self.rate
                    logger.warning(f"echo reference fell behind the mic by {behind_ms:.0f} ms (a busy machine?); "
                                   "the canceller may let some echo through until it catches up")
            self._segments.append((start, samples))
            self._end = start + len(samples)

    def flushed(self, still_playing_us: int = 0) -> None:
        """PulseAudio dropped what it had not played yet: cut the timeline at now, plus
        ``still_playing_us`` (the sink's own latency, which the flush cannot reach)."""
        cut = self._now_index() + int(still_playing_us * self.rate / 1_000_000)
        with self._lock:
            while self._segments and self._segments[-1][0] >= cut:
                self._segments.pop()
            if self._segments:
                first, samples = self._segments[-1]
                if first + len(samples) > cut:
                    self._segments[-1] = (first, samples[: cut - first])
            if self._end is not None:
                self._end = min(self._end, cut)
            self._resampler = None  # the played stream was cut: start the resampler afresh

    def take(self, start: int, n: int) -> np.ndarray:
        """The reference for timeline samples ``[start, start + n)`` (silence where nothing played)."""
        out = np.zeros(n, dtype=np.int16)
        with self._lock:
            self._consumed = max(self._consumed, start + n)
            while self._segments and self._segments[0][0] + len(self._segments[0][1]) < start - KEEP_S * self.rate:
                self._segments.popleft()
            for first, samples in self._segments:
                lo, hi = max(first, start), min(first + len(samples), start + n)
                if lo < hi:
                    out[lo - start : hi - start] = samples[lo - first : hi - first]
        return out

    def _resample(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        if sample_rate == self.rate:
            return samples
        import soxr

        if self._resampler is None or self._resampler_rate != sample_rate:
            self._resampler = soxr.ResampleStream(sample_rate, self.rate, 1, dtype="int16")
            self._resampler_rate = sample_rate
        return self._resampler.resample_chunk(samples)


class Aec3Canceller:
    """WebRTC AEC3 on the capture thread, with :attr:`reference` fed by the playback side."""

    label = "aec3"

    def __init__(self, rate: int = 16000, *, keep_output: bool = False, clock=time.monotonic, auto_gain: bool = False):
        """Create the canceller; ``auto_gain`` adds WebRTC's gain control after it (quiet callers louder).

        Raises:
            SetupError: The AEC3 binding is missing or refuses the rate (names ECHO_CANCELLER).
        """
        if rate not in (8000, 16000, 32000, 48000):
            raise SetupError(f"Setting ECHO_CANCELLER=aec3 cannot run at {rate} Hz: AEC3 takes 8, 16, 32 or 48 kHz "
                             "(AUDIO_IN_SAMPLE_RATE), or set ECHO_CANCELLER=pulse.")
        try:
            from livekit import rtc
        except ImportError as e:
            raise SetupError("Setting ECHO_CANCELLER=aec3 needs the livekit package (WebRTC AEC3), which is not "
                             "installed: run 'bash start.sh setup' (or pip install livekit), or set ECHO_CANCELLER=pulse.") from e
        self._rtc = rtc
        self.rate = rate
        self._frame = rate * FRAME_MS // 1000
        self._lag = int(REFERENCE_LAG_S * rate)
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True, auto_gain_control=auto_gain)
        self.reference = EchoReference(rate, clock)
        self._clock = clock
        self._count = 0  # mic samples seen
        self._anchor: float | None = None  # timeline index of mic sample 0 (earliest arrival)
        self._window_min = float("inf")
        self._window_blocks = 0
        self._failed = False
        self._warned_odd = False
        self.reanchors = 0
        self.presence = EchoPresence(rate)
        self.keep_output = keep_output
        self.output: list[tuple[float, bytes]] = []  # (capture time of the first sample, audio)
        self.fed: list[tuple[float, bytes]] = []  # the reference given to AEC3: (play time, audio)
        self.mic: list[tuple[float, bytes]] = []  # the mic as it came in (capture time, audio)
        self.anchors: list[tuple[float, float]] = []  # when the mic's timeline moved, and where to

    def __str__(self) -> str:
        return "Aec3Canceller"

    def process(self, audio: bytes) -> bytes:
        """Cancel one captured block (int16 mono at :attr:`rate`); returns a block of the same length.

        Never raises: a failure of AEC3 is logged once and the mic passes through.
        """
        mic = np.frombuffer(audio, dtype=np.int16)
        first = self._place(len(mic))
        if self._failed:
            return audio
        if len(mic) % self._frame:
            if not self._warned_odd:
                self._warned_odd = True
                logger.error(f"{self}: capture blocks of {len(mic)} samples are not whole {FRAME_MS} ms frames; "
                             "they pass through uncancelled")
            return audio
        try:
            out = self._cancel(mic, first)
        except Exception as e:  # noqa: BLE001 - the call goes on without cancellation
            self._failed = True
            logger.error(f"{self}: AEC3 failed ({type(e).__name__}: {e}); the mic passes through uncancelled")
            return audio
        data = out.tobytes()
        if self.keep_output:
            self.output.append((first / self.rate, data))
        return data

    def _place(self, n: int) -> int:
        """Timeline index of this block's first sample, from the sample count and the earliest arrival."""
        arrival = self._clock() * self.rate - (self._count + n)
        if self._anchor is None or arrival < self._anchor:
            self._anchor = arrival
            if self.keep_output:
                self.anchors.append((self._clock(), arrival))
        self._window_min = min(self._window_min, arrival)
        self._window_blocks += 1
        if self._window_blocks >= REANCHOR_WINDOW_BLOCKS:
            if self._window_min > self._anchor + REANCHOR_S * self.rate:
                late_ms = (self._window_min - self._anchor) * 1000 / self.rate
                self.reanchors += 1
                log = logger.warning if self.reanchors == 1 else logger.debug  # logged once, counted always
                log(f"{self}: the mic arrived {late_ms:.0f} ms later than before (audio dropped or the stream "
                    "reattached); re-aligned with the reference")
                self._anchor = self._window_min
            self._window_min, self._window_blocks = float("inf"), 0
        first = int(round(self._anchor)) + self._count
        self._count += n
        return first

    def _cancel(self, mic: np.ndarray, first: int) -> np.ndarray:
        rtc, frame = self._rtc, self._frame
        out = np.empty_like(mic)
        fed = self.reference.take(first - self._lag, len(mic))
        self._note_presence(fed, mic)
        if self.keep_output:
            self.fed.append(((first - self._lag) / self.rate, fed.tobytes()))
            self.mic.append((first / self.rate, mic.tobytes()))
        for i in range(0, len(mic), frame):
            ref = fed[i : i + frame]
            self._apm.process_reverse_stream(rtc.AudioFrame(bytearray(ref.tobytes()), self.rate, 1, frame))
            self._apm.set_stream_delay_ms(0)  # the reference is already placed at its play time
            near = rtc.AudioFrame(bytearray(mic[i : i + frame].tobytes()), self.rate, 1, frame)
            self._apm.process_stream(near)
            out[i : i + frame] = np.frombuffer(near.data, dtype=np.int16)
        # AEC3 keeps running (and learning) either way; on a line without echo its output would
        # only be the caller, suppressed whenever Annie speaks.
        return mic.copy() if self.presence.echo_free else out

    def _note_presence(self, fed: np.ndarray, mic: np.ndarray) -> None:
        was_free = self.presence.echo_free
        found = self.presence.add(fed, mic)
        if found is not None:  # one 2 s window of Annie's speech judged (numbers only)
            logger.debug(f"{self}: echo presence: peak ratio {self.presence.last_ratio:.1f} "
                         f"({'echo' if found else 'none'}; {self.presence.absent} windows without in a row)")
        if found is None or was_free == self.presence.echo_free:
            return
        if self.presence.echo_free:
            logger.info(f"{self}: no echo of Annie on this line for {ABSENT_WINDOWS * WINDOW_S:.0f} s of her speech; "
                        "the mic passes through uncancelled until one shows up")
        else:
            logger.info(f"{self}: Annie's echo is back on the line; cancelling again")


def make_canceller(kind: str, rate: int = 16000, *, keep_output: bool = False) -> Aec3Canceller | None:
    """The in-process canceller for ``ECHO_CANCELLER`` (``aec3``), None for ``pulse`` and ``off``.

    Raises:
        SetupError: aec3 cannot start here (one sentence naming the setting).
    """
    if kind == "aec3":
        return Aec3Canceller(rate, keep_output=keep_output)
    return None


def raw_line_devices(server: str | None, source: str, sink: str) -> tuple[str, str]:
    """The raw line under a canceller's devices: ``echo_cancel_source`` -> its master source, etc.

    ``module-echo-cancel`` names its masters in ``device.master_device``; a device that is not a
    filter (already raw) or that the server does not have is returned as it is (the transport's
    own start-up check then names the setting).
    """
    import pulsectl

    from transports._pulse_io import _connect_control

    try:
        pulse = _connect_control(server, "annie-aec-devices")
    except (pulsectl.PulseError, pulsectl.PulseDisconnected):
        return source, sink
    try:
        found = []
        for name, lookup in ((source, pulse.get_source_by_name), (sink, pulse.get_sink_by_name)):
            try:
                found.append(lookup(name).proplist.get("device.master_device") or name)
            except pulsectl.PulseIndexError:
                found.append(name)
        return found[0], found[1]
    finally:
        pulse.close()

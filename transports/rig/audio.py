"""Audio in and out of a PulseAudio rig: speech synthesis, timed playback and timed recording.

Used by :mod:`transports.rig.pulse` and by tests and benchmarks that measure what reaches a
device and when. Audio is int16 mono numpy arrays; times are ``time.monotonic()`` seconds, the
clock the transport's own events can be compared with.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transports._pulse_stream import PulseStream, PulseStreamError

SILENCE_DBFS = -120.0


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level of int16 audio in dB relative to full scale (-120 for digital silence)."""
    if samples.size == 0:
        return SILENCE_DBFS
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    return max(SILENCE_DBFS, 20.0 * np.log10(rms / 32768.0 + 1e-12))


def synth_speech(text: str, sample_rate: int = 16000, voice: str = "en-us", wpm: int = 150) -> np.ndarray:
    """Speak ``text`` with espeak-ng and return int16 mono audio at ``sample_rate`` (via sox).

    Raises:
        RuntimeError: espeak-ng or sox failed (both are Debian packages of the same names).
    """
    with tempfile.TemporaryDirectory(prefix="annie-tts-") as tmp:
        raw, out = Path(tmp) / "espeak.wav", Path(tmp) / "out.raw"
        for cmd in (
            ["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text],
            ["sox", str(raw), "-r", str(sample_rate), "-c", "1", "-b", "16", "-e", "signed",
             "-t", "raw", str(out)],
        ):
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed: {result.stderr.strip()}")
        return np.frombuffer(out.read_bytes(), dtype=np.int16).copy()


def tone(freq_hz: float, seconds: float, sample_rate: int, level_dbfs: float = -10.0) -> np.ndarray:
    """A sine tone as int16 mono audio."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    amplitude = 32767 * 10 ** (level_dbfs / 20)
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.int16)


def path_delay(reference: Recording, heard: Recording, max_delay_s: float = 0.7) -> tuple[float, float]:
    """Delay (ms) and gain (dB) from one recording to another of the same sound (cross-correlation).

    Both recordings are placed on their own capture timelines (:meth:`Recording.start_time`), so a
    recorder's own latency cancels out. The gain is the peak correlation's regression slope.
    """
    offset = int(round((heard.start_time() - reference.start_time()) * reference.sample_rate))
    ref = reference.samples.astype(np.float64)
    mic = heard.samples.astype(np.float64)
    n = len(ref) + len(mic)
    corr = np.fft.irfft(np.fft.rfft(mic, n) * np.conj(np.fft.rfft(ref, n)), n)
    # corr[k]: mic[i + k] ~ ref[i]; heard sample j is at reference sample j + offset.
    lags = np.arange(n)
    lags[lags > n // 2] -= n
    delay = lags + offset
    keep = (delay >= 0) & (delay <= max_delay_s * reference.sample_rate)
    best = int(np.argmax(np.abs(corr) * keep))
    gain = abs(corr[best]) / max(float(ref @ ref), 1e-9)
    return 1000.0 * delay[best] / reference.sample_rate, 20.0 * np.log10(max(gain, 1e-9))


class Playback:
    """Plays int16 mono audio into a sink on its own thread; ``wait()`` until it has been played."""

    def __init__(self, server: str, sink: str, audio: np.ndarray, sample_rate: int) -> None:
        """Start playing at once.

        Args:
            server: The rig's server string.
            sink: Sink to play into.
            audio: int16 mono samples.
            sample_rate: Their rate; PulseAudio resamples to the sink.
        """
        self.started_at = 0.0
        self.finished_at = 0.0
        self.duration_s = len(audio) / sample_rate
        self.error: Exception | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(server, sink, audio.astype(np.int16).tobytes(), sample_rate),
            name=f"rig-play-{sink}", daemon=True,
        )
        self._thread.start()

    def _run(self, server: str, sink: str, data: bytes, sample_rate: int) -> None:
        try:
            with PulseStream(
                "playback", sample_rate=sample_rate, channels=1, server=server, device=sink,
                app_name="annie-rig", stream_name=f"rig-play-{sink}",
            ) as stream:
                self.started_at = time.monotonic()
                stream.write(data)
                stream.drain(timeout=self.duration_s + 10.0)
        except PulseStreamError as e:
            self.error = e
        finally:
            self.finished_at = time.monotonic()
            self._done.set()

    def wait(self, timeout: float | None = None) -> Playback:
        """Block until the audio has been played (drained).

        Raises:
            TimeoutError: Not done within ``timeout``.
            RuntimeError: PulseAudio refused the stream.
        """
        if not self._done.wait(timeout):
            raise TimeoutError("playback still running")
        if self.error is not None:
            raise RuntimeError(f"playback failed: {self.error}") from self.error
        return self


@dataclass
class Recording:
    """Timed audio from a source: ``block_end_times[i]`` is when block ``i`` was read."""

    samples: np.ndarray
    sample_rate: int
    block_samples: int
    block_end_times: np.ndarray = field(repr=False)

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate

    def between(self, start: float, end: float) -> np.ndarray:
        """The samples of the blocks read between two monotonic times."""
        keep = (self.block_end_times > start) & (self.block_end_times <= end)
        blocks = self.samples[: len(self.block_end_times) * self.block_samples].reshape(
            -1, self.block_samples
        )
        return blocks[keep].reshape(-1)

    def start_time(self) -> float:
        """Best estimate of when the first sample was captured (monotonic seconds).

        Blocks arrive continuously but are read late by a varying amount; the median over all
        blocks of (read time - samples so far) is robust to that jitter.
        """
        n = len(self.block_end_times)
        if n == 0:
            return 0.0
        block_s = self.block_samples / self.sample_rate
        return float(np.median(self.block_end_times - block_s * np.arange(1, n + 1)))

    def block_dbfs(self) -> np.ndarray:
        """Level of each block, in dBFS."""
        n = len(self.block_end_times)
        blocks = self.samples[: n * self.block_samples].reshape(n, self.block_samples)
        return np.array([rms_dbfs(b) for b in blocks])

    def rms_dbfs(self) -> float:
        return rms_dbfs(self.samples)

    def last_loud_time(self, threshold_dbfs: float, after: float = 0.0) -> float | None:
        """Read time of the last block louder than ``threshold_dbfs`` (None if there is none)."""
        loud = (self.block_dbfs() > threshold_dbfs) & (self.block_end_times > after)
        return float(self.block_end_times[loud][-1]) if loud.any() else None

    def first_loud_time(self, threshold_dbfs: float, after: float = 0.0) -> float | None:
        """Read time of the first block louder than ``threshold_dbfs`` (None if there is none)."""
        loud = (self.block_dbfs() > threshold_dbfs) & (self.block_end_times > after)
        return float(self.block_end_times[loud][0]) if loud.any() else None


class Recorder:
    """Records a source on its own thread in small blocks, timestamping each block."""

    def __init__(self, server: str, source: str, sample_rate: int = 16000, block_ms: int = 10) -> None:
        """Start recording at once.

        Raises:
            RuntimeError: PulseAudio refused the stream (e.g. no such source).
        """
        self.sample_rate = sample_rate
        self._block = sample_rate * block_ms // 1000
        nbytes = self._block * 2
        try:
            self._stream = PulseStream(
                "record", sample_rate=sample_rate, channels=1, server=server, device=source,
                app_name="annie-rig", stream_name=f"rig-record-{source}", fragsize=nbytes,
                maxlength=nbytes * 50,
            )
        except PulseStreamError as e:
            raise RuntimeError(f"cannot record {source!r}: {e}") from e
        self._blocks: list[bytes] = []
        self._times: list[float] = []
        self._stop = threading.Event()
        self.error: Exception | None = None
        self.recording: Recording | None = None
        self._thread = threading.Thread(target=self._run, name=f"rig-rec-{source}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._stream.read(self._block * 2, timeout=0.5)
                if data is None:
                    continue
                now = time.monotonic()
                self._blocks.append(data)  # before its time, so snapshot() never lacks a block
                self._times.append(now)
        except PulseStreamError as e:  # the server went away: the recording ends here
            self.error = e
        finally:
            self._stream.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Recording:
        """Stop and return what was recorded (also kept in :attr:`recording`)."""
        if self.recording is None:
            self._stop.set()
            self._thread.join(timeout=5)
            samples = np.frombuffer(b"".join(self._blocks), dtype=np.int16).copy()
            self.recording = Recording(
                samples, self.sample_rate, self._block, np.array(self._times, dtype=np.float64)
            )
        return self.recording

    def snapshot(self) -> Recording:
        """What was recorded so far, without stopping."""
        n = len(self._times)
        samples = np.frombuffer(b"".join(self._blocks[:n]), dtype=np.int16).copy()
        return Recording(samples, self.sample_rate, self._block, np.array(self._times[:n]))

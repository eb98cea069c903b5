"""PulseAudio measurements for the preflight gates: devices present, echo cancellation depth.

Blocking helpers (subprocesses ``pactl``, ``paplay``, ``parec`` from pulseaudio-utils); the
preflight runs them in a worker thread. They talk to the PulseAudio server the agent would use:
``PULSE_SERVER`` / ``XDG_RUNTIME_DIR`` from the environment, or ``server`` when given.
"""

from __future__ import annotations

import os
import shutil
import signal as signal_module
import subprocess
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AEC_TEST_TEXT = ("This is the echo test. Annie is speaking into the phone line, and nothing comes back. "
                 "She keeps talking for a few seconds more, so every canceller has time to learn the line.")
CONVERGE_S = 1.0  # the canceller adapts during the first second; measure after it
AEC3_CONVERGE_S = 2.0  # AEC3 leaks for about two seconds while it converges
SETTLE_S = 0.3  # keep recording this long after the playback drained
SILENCE_DBFS = -120.0


class AudioCheckError(Exception):
    """The measurement could not be made; the message says why and what to check."""


def _pactl(*args: str, server: str | None = None) -> str:
    if shutil.which("pactl") is None:
        raise AudioCheckError("pactl is not installed (Debian package pulseaudio-utils)")
    env = dict(os.environ)
    if server:
        env["PULSE_SERVER"] = server
    try:
        result = subprocess.run(["pactl", *args], env=env, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired as e:
        raise AudioCheckError("PulseAudio did not answer within 10 s") from e
    if result.returncode != 0:
        detail = " ".join(result.stderr.split()) or "pactl failed"
        where = env.get("PULSE_SERVER") or f"XDG_RUNTIME_DIR={env.get('XDG_RUNTIME_DIR', '(unset)')}"
        raise AudioCheckError(
            f"cannot talk to PulseAudio ({where}): {detail}; "
            "set PULSE_SERVER or XDG_RUNTIME_DIR to the server the phone is bridged into"
        )
    return result.stdout


def device_names(kind: str, server: str | None = None) -> list[str]:
    """Names of the server's ``sources`` or ``sinks``."""
    out = _pactl("list", "short", kind, server=server)
    return [line.split("\t")[1] for line in out.splitlines() if "\t" in line]


def echo_cancel_master(source: str, server: str | None = None) -> str | None:
    """The raw mic behind ``source`` when it is a module-echo-cancel source, else None."""
    out = _pactl("list", "short", "modules", server=server)
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[1] != "module-echo-cancel":
            continue
        args = dict(a.split("=", 1) for a in fields[2].split() if "=" in a)
        if args.get("source_name") == source:
            return args.get("source_master")
    return None


@dataclass
class EchoMeasurement:
    """Levels in dBFS over the played signal (after the canceller's first second).

    ``aec3_dbfs``: the raw mic after WebRTC AEC3 run on it as the agent would (ECHO_CANCELLER=aec3),
    with the played signal as its reference (after AEC3's first two seconds); None when the raw
    mic was not found or the binding is missing (``aec3_note`` says which).
    """

    played_dbfs: float
    source_dbfs: float
    raw_mic: str | None
    raw_mic_dbfs: float | None
    echo_delay_ms: float | None = None
    aec3_dbfs: float | None = None
    aec3_note: str = ""

    @property
    def attenuation_db(self) -> float:
        """How much quieter the played signal is at the configured source."""
        return round(self.played_dbfs - self.source_dbfs, 1)

    @property
    def erle_db(self) -> float | None:
        """Echo return loss enhancement: raw mic level minus the cancelled level."""
        return None if self.raw_mic_dbfs is None else round(self.raw_mic_dbfs - self.source_dbfs, 1)


def measure_echo(sink: str, source: str, server: str | None = None, sample_rate: int = 16000) -> EchoMeasurement:
    """Play espeak-ng speech into ``sink`` (paplay) while recording ``source`` and its raw mic (parec)."""
    from agent.demo.stt_probe import write_speech_wav

    for tool in ("paplay", "parec"):
        if shutil.which(tool) is None:
            raise AudioCheckError(f"{tool} is not installed (Debian package pulseaudio-utils)")
    raw_mic = echo_cancel_master(source, server)
    env = dict(os.environ) | ({"PULSE_SERVER": server} if server else {})
    # The raw line is recorded in any case (the source itself when it is not a canceller's).
    with tempfile.TemporaryDirectory(prefix="annie-aec-") as tmp:
        wav = Path(tmp) / "signal.wav"
        try:
            write_speech_wav(AEC_TEST_TEXT, wav, sample_rate)
        except (OSError, RuntimeError) as e:
            raise AudioCheckError(f"cannot synthesize the test signal ({e}); install espeak-ng and sox") from e
        signal = _read_wav(wav)
        devices = {"source": source, "raw": raw_mic or source}
        recorders = {name: _Parec(dev, Path(tmp) / f"{name}.raw", sample_rate, env) for name, dev in devices.items()}
        # In process, with a time for every block: the sink's monitor (what was played, when) and
        # the raw mic, for the echo's delay and for AEC3.
        timed = _timed_recorders(server, {"played": f"{sink}.monitor", "raw": devices["raw"]}, sample_rate)
        try:
            time.sleep(0.3)  # recording before the signal starts
            play_start = time.monotonic()
            played = subprocess.run(
                ["paplay", f"--device={sink}", str(wav)], env=env, capture_output=True, text=True,
                timeout=len(signal) / sample_rate + 15,
            )
            play_end = time.monotonic()
            time.sleep(SETTLE_S)
        finally:
            for rec in recorders.values():
                rec.stop()
            recordings = {name: rec.stop() for name, rec in timed.items()}
        if played.returncode != 0:
            raise AudioCheckError(f"cannot play into {sink!r}: {played.stderr.strip() or 'paplay failed'}")
        levels = {}
        for name, rec in recorders.items():
            if rec.failed:
                raise AudioCheckError(f"cannot record {devices[name]!r}: {rec.error}")
            levels[name] = round(rms_dbfs(rec.window(play_start + CONVERGE_S, play_end)), 1)
    raw, played = recordings["raw"], recordings.get("played")
    raw_track = raw.samples
    offset = int((play_start - raw.start_time()) * sample_rate)
    delay = None
    if played is not None and played.samples.any():
        delay = echo_delay_ms(played.samples, raw_track, int((played.start_time() - raw.start_time()) * sample_rate),
                              sample_rate)
    aec3_dbfs, note = aec3_level(signal, raw_track, offset, sample_rate,
                                 int((AEC3_CONVERGE_S + (delay or 0) / 1000) * sample_rate), len(signal))
    return EchoMeasurement(
        played_dbfs=round(rms_dbfs(signal[int(CONVERGE_S * sample_rate) :]), 1),
        source_dbfs=levels["source"],
        raw_mic=raw_mic,
        raw_mic_dbfs=levels["raw"] if raw_mic else None,
        echo_delay_ms=delay,
        aec3_dbfs=aec3_dbfs,
        aec3_note=note,
    )


def echo_delay_ms(played: np.ndarray, raw: np.ndarray, offset: int, rate: int, max_s: float = 0.8) -> float | None:
    """The echo's delay (ms) from ``played`` to ``raw``, whose sample ``j + offset`` is simultaneous
    with ``played[j]``; None when no echo stands out of the cross-correlation."""
    ref, mic = played.astype(np.float64), raw.astype(np.float64)
    if not ref.any() or not mic.any():
        return None
    n = len(ref) + len(mic)
    corr = np.abs(np.fft.irfft(np.fft.rfft(mic, n) * np.conj(np.fft.rfft(ref, n)), n))
    lags = np.arange(n)
    lags[lags > n // 2] -= n  # corr[k]: mic[i + k] ~ ref[i]
    delay = lags - offset
    keep = (delay >= 0) & (delay <= max_s * rate)
    if not keep.any():
        return None
    best = int(np.argmax(np.where(keep, corr, 0.0)))
    # A peak that stands out of the correlation's spread: an echo, not chance.
    if corr[best] < 15 * np.median(corr[keep]):
        return None
    return round(1000 * delay[best] / rate, 1)


def aec3_level(signal: np.ndarray, raw: np.ndarray, offset: int, rate: int, start: int, length: int) -> tuple[float | None, str]:
    """The raw mic after AEC3 as the agent runs it, its level (dBFS) over ``[start, length)`` of the signal.

    The reference is placed where the play began (the agent places what it writes at the time of
    the write); AEC3 finds the rest of the delay itself, as on a call.
    """
    from processors.errors import SetupError
    from transports.aec import Aec3Canceller

    clock = _Clock()
    try:
        canceller = Aec3Canceller(rate, clock=clock)
    except SetupError as e:
        return None, str(e)
    canceller.reference.written(signal.astype(np.int16).tobytes(), rate, offset / rate)
    block = rate // 50
    out = np.zeros(len(raw) // block * block, dtype=np.int16)
    for i in range(0, len(out), block):
        clock.t = (i + block) / rate  # read when the block is complete: the mic's timeline is the recording's
        out[i : i + block] = np.frombuffer(canceller.process(raw[i : i + block].tobytes()), dtype=np.int16)
    window = out[max(0, offset + start) : offset + length]
    return round(rms_dbfs(window), 1), ""


def _timed_recorders(server: str | None, devices: dict[str, str], rate: int) -> dict:
    """Start in-process recorders (``transports.rig.audio.Recorder``); a monitor that cannot be
    recorded is left out (the delay is then not reported), the raw mic must be."""
    from transports.rig.audio import Recorder

    started = {}
    for name, device in devices.items():
        try:
            started[name] = Recorder(server, device, rate)
        except RuntimeError as e:
            if name == "raw":
                for rec in started.values():
                    rec.stop()
                raise AudioCheckError(f"cannot record {device!r}: {e}") from e
    return started


class _Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level of int16 audio in dBFS (-120 for silence or nothing)."""
    if samples.size == 0:
        return SILENCE_DBFS
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    return max(SILENCE_DBFS, 20.0 * float(np.log10(rms / 32768.0 + 1e-12)))


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


class _Parec:
    """``parec`` recording a source into a raw file; ``window()`` maps monotonic times to samples."""

    def __init__(self, device: str, path: Path, sample_rate: int, env: dict[str, str]) -> None:
        self._path, self._rate = path, sample_rate
        self._out = open(path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            ["parec", f"--device={device}", "--format=s16le", f"--rate={sample_rate}", "--channels=1",
             "--raw", "--latency-msec=20"],
            env=env, stdout=self._out, stderr=subprocess.PIPE,
        )
        self.started_at = time.monotonic()
        self.error = ""

    @property
    def failed(self) -> bool:
        return self._proc.returncode not in (None, 0, -signal_module.SIGTERM)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
        try:
            _, err = self._proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        self.error = (err or b"").decode(errors="replace").strip() or f"parec exited with {self._proc.returncode}"
        self._out.close()

    def window(self, start: float, end: float) -> np.ndarray:
        samples = np.frombuffer(self._path.read_bytes(), dtype=np.int16)
        first = max(0, int((start - self.started_at) * self._rate))
        last = max(first, int((end - self.started_at) * self._rate))
        return samples[first:last]

"""PulseAudio measurements for the preflight gates: devices present, echo cancellation depth.

Blocking helpers (subprocess ``pactl``, libpulse through the rig's Playback/Recorder); the
preflight runs them in a worker thread. They talk to the PulseAudio server the agent would use:
``PULSE_SERVER`` / ``XDG_RUNTIME_DIR`` from the environment, or ``server`` when given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

AEC_TEST_TEXT = "This is the echo test. Annie is speaking into the phone line, and nothing comes back."
CONVERGE_S = 1.0  # the canceller adapts during the first second; measure after it
SETTLE_S = 0.3  # keep recording this long after the playback drained


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
    """Levels in dBFS over the played signal (after the canceller's first second)."""

    played_dbfs: float
    source_dbfs: float
    raw_mic: str | None
    raw_mic_dbfs: float | None

    @property
    def attenuation_db(self) -> float:
        """How much quieter the played signal is at the configured source."""
        return self.played_dbfs - self.source_dbfs

    @property
    def erle_db(self) -> float | None:
        """Echo return loss enhancement: raw mic level minus the cancelled level."""
        return None if self.raw_mic_dbfs is None else self.raw_mic_dbfs - self.source_dbfs


def measure_echo(sink: str, source: str, server: str | None = None, sample_rate: int = 16000) -> EchoMeasurement:
    """Play espeak-ng speech into ``sink`` while recording ``source`` (and its raw mic)."""
    from transports.rig_audio import Playback, Recorder, rms_dbfs, synth_speech

    try:
        signal = synth_speech(AEC_TEST_TEXT, sample_rate)
    except (OSError, RuntimeError) as e:
        raise AudioCheckError(f"cannot synthesize the test signal ({e}); install espeak-ng and sox") from e
    raw_mic = echo_cancel_master(source, server)
    recorders = {}
    try:
        recorders["source"] = Recorder(server, source, sample_rate)
        if raw_mic:
            recorders["raw"] = Recorder(server, raw_mic, sample_rate)
        time.sleep(0.2)  # streams running before the signal starts
        playback = Playback(server, sink, signal, sample_rate)
        playback.wait(timeout=len(signal) / sample_rate + 10)
        time.sleep(SETTLE_S)
    except RuntimeError as e:
        raise AudioCheckError(f"cannot play into {sink!r} or record {source!r}: {e}") from e
    finally:
        recordings = {name: rec.stop() for name, rec in recorders.items()}
    start, end = playback.started_at + CONVERGE_S, playback.finished_at
    played = rms_dbfs(signal[int(CONVERGE_S * sample_rate) :])
    levels = {name: rms_dbfs(rec.between(start, end)) for name, rec in recordings.items()}
    return EchoMeasurement(
        played_dbfs=round(played, 1),
        source_dbfs=round(levels["source"], 1),
        raw_mic=raw_mic,
        raw_mic_dbfs=round(levels["raw"], 1) if "raw" in levels else None,
    )


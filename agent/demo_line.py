"""The demo's phone line: the private PulseAudio rig when it can run, else the simulated line.

Both lines offer the same small surface to the scripted caller of :mod:`agent.simulate`:
``transport`` for the pipeline, ``say()`` to speak as the caller, ``sink_loud_seconds()`` and
``sink_last_loud()`` to see what reached the caller's ear, and ``write_wavs()`` for the
recordings. Times are ``time.monotonic()`` seconds.

- :class:`RigLine`: :class:`transports.pulse_rig.PulseRig` (a private PulseAudio daemon with
  webrtc echo cancellation, optionally an echo path) and
  :class:`transports.pulse.PulseAudioTransport` on it. The caller's voice is played into the rig's microphone; Annie's voice is recorded at
  the earpiece (the speaker's monitor), and what Annie heard after echo cancellation too.
- :class:`SimulatedLine`: :class:`transports.simulated.SimulatedPhoneTransport`, no sound server.
"""

from __future__ import annotations

import importlib.util
import wave
from pathlib import Path
from typing import Protocol

import numpy as np
from loguru import logger
from pipecat.transports.base_transport import BaseTransport

CALLER_RATE = 16000
BLOCK_S = 0.01
# A 10 ms block louder than this (int16 RMS, about -40 dBFS) counts as sound.
LOUD_RMS = 300.0


class DemoLine(Protocol):
    """What the scripted caller needs from a phone line."""

    label: str
    transport: BaseTransport

    def say(self, pcm16k: np.ndarray) -> float:
        """Start speaking int16 16 kHz audio as the caller now; returns its duration."""

    def sink_loud_seconds(self, start: float, end: float) -> float:
        """Seconds of sound that reached the caller's ear between two monotonic times."""

    def sink_last_loud(self, before: float | None = None) -> float | None:
        """When sound last reached the caller's ear (before ``before``, if given)."""

    def write_wavs(self, out: Path, t0: float) -> dict[str, Path]:
        """Write the call's recordings (timeline starting at ``t0``); name -> path."""

    def close(self) -> None:
        """Release the line; safe to call twice."""


def loud_seconds(pcm: np.ndarray, rate: int) -> float:
    """Seconds of 10 ms blocks louder than :data:`LOUD_RMS` in int16 audio."""
    return float(_loud_blocks(pcm, rate).sum() * BLOCK_S)


def loud_onset(pcm: np.ndarray, rate: int) -> float:
    """Seconds from the start of int16 audio to its first loud 10 ms block (0 if none)."""
    loud = np.flatnonzero(_loud_blocks(pcm, rate))
    return float(loud[0] * BLOCK_S) if loud.size else 0.0


def _loud_blocks(pcm: np.ndarray, rate: int) -> np.ndarray:
    block = int(rate * BLOCK_S)
    n = len(pcm) // block
    if n == 0:
        return np.zeros(0, dtype=bool)
    blocks = pcm[: n * block].astype(np.float32).reshape(n, block)
    return np.sqrt((blocks**2).mean(axis=1)) > LOUD_RMS


def write_timeline_wav(path: Path, pieces: list[tuple[float, bytes]], rate: int, t0: float) -> None:
    """Lay timestamped int16 PCM pieces on a silent timeline from ``t0`` and write a WAV file."""
    end = max((t - t0 + len(pcm) / 2 / rate for t, pcm in pieces), default=0.0)
    track = np.zeros(int(end * rate) + 1, dtype=np.int16)
    for t, pcm in pieces:
        start = max(0, int((t - t0) * rate))
        samples = np.frombuffer(pcm, dtype=np.int16)[: len(track) - start]
        track[start : start + len(samples)] = samples
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(track.tobytes())


class SimulatedLine:
    """The simulated phone line: no sound server, audio kept in memory with its play times."""

    def __init__(self, out_rate: int, why: str = ""):
        """``why``: the reason the PulseAudio rig is not used, for the label."""
        from transports.simulated import SimulatedPhoneParams, SimulatedPhoneTransport

        self._out_rate = out_rate
        self.label = "simulated line, no sound server" + (f" ({why})" if why else "")
        self.transport = SimulatedPhoneTransport(
            SimulatedPhoneParams(audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=CALLER_RATE,
                                 audio_out_sample_rate=out_rate)
        )

    def say(self, pcm16k: np.ndarray) -> float:
        return self.transport.say(pcm16k)

    def sink_loud_seconds(self, start: float, end: float) -> float:
        total = 0.0
        for chunk in list(self.transport.loudspeaker.played):
            if chunk.t + chunk.duration <= start or chunk.t >= end:
                continue
            samples = np.frombuffer(chunk.pcm, dtype=np.int16)
            first = max(0, int((start - chunk.t) * chunk.sample_rate))
            last = min(len(samples), int((end - chunk.t) * chunk.sample_rate))
            total += loud_seconds(samples[first:last], chunk.sample_rate)
        return total

    def sink_last_loud(self, before: float | None = None) -> float | None:
        for chunk in reversed(list(self.transport.loudspeaker.played)):
            if before is not None and chunk.t >= before:
                continue
            samples = np.frombuffer(chunk.pcm, dtype=np.int16)
            if before is not None:
                samples = samples[: max(0, int((before - chunk.t) * chunk.sample_rate))]
            loud = np.flatnonzero(_loud_blocks(samples, chunk.sample_rate))
            if loud.size:
                return chunk.t + (loud[-1] + 1) * BLOCK_S
        return None

    def write_wavs(self, out: Path, t0: float) -> dict[str, Path]:
        paths = {"caller": out / "caller.wav", "annie": out / "annie.wav"}
        write_timeline_wav(paths["caller"], list(self.transport.caller.heard), CALLER_RATE, t0)
        played = [(c.t, c.pcm) for c in self.transport.loudspeaker.played]
        write_timeline_wav(paths["annie"], played, self._out_rate, t0)
        return paths

    def close(self) -> None:
        pass


def rig_usable() -> str | None:
    """None when the PulseAudio rig can run here, else the reason it cannot."""
    for module in ("transports.pulse", "transports.pulse_rig"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not available"
    from transports.pulse_rig import pulseaudio_available

    if not pulseaudio_available():
        return "pulseaudio is not installed (apt-get install pulseaudio pulseaudio-utils)"
    return None


class RigLine:
    """The phone in a box: a private PulseAudio daemon with echo cancellation (see module doc)."""

    def __init__(self, out_rate: int, echo_path: bool = False):
        from transports.pulse import PulseAudioParams, PulseAudioTransport
        from transports.pulse_rig import PulseRig

        self._out_rate = out_rate
        self.label = "private PulseAudio rig, webrtc echo canceller, " + (
            "30 ms echo path from the earpiece into the mic" if echo_path else "no echo path"
        )
        self._rig = PulseRig(echo_path=echo_path)
        self._rig.start()
        self._recorders = []
        try:
            self.transport = PulseAudioTransport(
                PulseAudioParams(
                    server=self._rig.server, source=PulseRig.SOURCE, sink=PulseRig.SINK,
                    audio_in_enabled=True, audio_out_enabled=True,
                    audio_in_sample_rate=CALLER_RATE, audio_out_sample_rate=out_rate,
                )
            )
            # What the caller hears (the earpiece) and what Annie hears (the echo-cancelled mic).
            self._earpiece = self._rig.record(PulseRig.SPEAKER_MONITOR, sample_rate=out_rate)
            self._recorders.append(self._earpiece)
            self._agent_ear = self._rig.record(PulseRig.SOURCE, sample_rate=CALLER_RATE)
            self._recorders.append(self._agent_ear)
        except BaseException:
            self.close()
            raise
        self._caller: list[tuple[object, np.ndarray]] = []

    def say(self, pcm16k: np.ndarray) -> float:
        self._caller.append((self._rig.play(pcm16k, CALLER_RATE), pcm16k))
        return len(pcm16k) / CALLER_RATE

    def _earpiece_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Loudness and end time of each 10 ms block recorded at the earpiece so far."""
        rec = self._earpiece.snapshot()
        n = len(rec.block_end_times)
        loud = _loud_blocks(rec.samples[: n * rec.block_samples], rec.sample_rate)
        return loud, rec.block_end_times[: len(loud)]

    def sink_loud_seconds(self, start: float, end: float) -> float:
        loud, times = self._earpiece_blocks()
        return float((loud & (times > start) & (times <= end)).sum() * BLOCK_S)

    def sink_last_loud(self, before: float | None = None) -> float | None:
        loud, times = self._earpiece_blocks()
        if before is not None:
            loud = loud & (times < before)
        return float(times[loud][-1]) if loud.any() else None

    def write_wavs(self, out: Path, t0: float) -> dict[str, Path]:
        paths = {"caller": out / "caller.wav", "annie": out / "annie.wav", "agent_heard": out / "agent_heard.wav"}
        caller = [(p.started_at, pcm.astype(np.int16).tobytes()) for p, pcm in self._caller if p.started_at]
        write_timeline_wav(paths["caller"], caller, CALLER_RATE, t0)
        for name, recorder in (("annie", self._earpiece), ("agent_heard", self._agent_ear)):
            rec = recorder.snapshot()
            pieces = [
                (float(t) - BLOCK_S, rec.samples[i * rec.block_samples : (i + 1) * rec.block_samples].tobytes())
                for i, t in enumerate(rec.block_end_times)
            ]
            write_timeline_wav(paths[name], pieces, rec.sample_rate, t0)
        return paths

    def close(self) -> None:
        recorders, self._recorders = self._recorders, []
        for recorder in recorders:
            recorder.stop()
        self._rig.stop()


def open_line(out_rate: int, *, prefer_rig: bool = True, echo_path: bool = False) -> DemoLine:
    """The rig when it can run here (and ``prefer_rig``), else the simulated line.

    ``echo_path`` loops the earpiece back into the mic as a speakerphone would. Off by default:
    on a busy 2-core machine the webrtc canceller leaves enough of Annie's voice for Silero to
    hear her now and then, and with barge-in on she then interrupts herself.
    """
    if not prefer_rig:
        return SimulatedLine(out_rate, "asked for")
    why = rig_usable()
    if why is None:
        from transports.pulse_rig import RigError

        try:
            return RigLine(out_rate, echo_path=echo_path)
        except RigError as e:
            logger.warning(f"the PulseAudio rig did not start, using the simulated line: {e}")
            why = "the PulseAudio rig did not start; see the log"
    return SimulatedLine(out_rate, why)


"""The phone lines a call is tried on, outside a real phone: the demo's, the benchmarks', the tests'.

Each line gives the pipeline a ``transport``, lets the caller speak (``say``), and shows what
reached the caller's ear, live (``sink_loud_seconds``, ``sink_last_loud``) and afterwards as the
two channels Full-Duplex-Bench segments (``channels``: the caller alone and what reached the ear,
int16 16 kHz on one ``time.monotonic()`` timeline) or as WAV files (``write_wavs``).

- :class:`RigLine`: the private PulseAudio rig (:class:`transports.rig.pulse.PulseRig`, webrtc
  echo cancellation, optionally an echo path from the earpiece back into the mic) with the
  PulseAudio transport on it. With ``caller_bus`` the caller plays into a private null sink that a
  loopback carries into the rig's microphone, so the caller's channel is recorded clean (its
  onset is a loopback latency *earlier* than at the microphone: stop latencies err long);
  without it the caller plays straight into the microphone. Annie's channel is the earpiece
  (the speaker's monitor); what the agent heard (the cancelled mic) is kept too.
- :class:`SimLine`: :class:`transports.rig.simulated.SimulatedPhoneTransport` (no sound server,
  no echo): the caller channel is exactly what the pipeline was fed, the ear exactly what the
  sink played.

Both take a phone line model (:mod:`transports.rig.linemodel`: a preset such as ``handset``):
the caller's voice then arrives band-limited and at the line's level, and on the rig Annie's echo
comes back with the line's delay, loss, band and distortion, over the caller's room. The rig's
``canceller`` picks who cancels the echo: ``pulse`` (PulseAudio's webrtc module, the agent on the
cancelled source), ``aec3`` (the agent reads the raw mic and cancels in process,
:mod:`transports.aec`) or ``off`` (the raw mic, no canceller).
"""

from __future__ import annotations

import importlib.util
import wave
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import soxr
from loguru import logger

from transports.aec import make_canceller
from transports.rig.linemodel import LineModel

CALLER_RATE = 16000
Canceller = Literal["pulse", "aec3", "off"]
CANCELLER_LABELS = {"pulse": "PulseAudio webrtc echo canceller", "aec3": "AEC3 in process on the raw mic",
                    "off": "no echo canceller"}
BLOCK_S = 0.01
# A 10 ms block louder than this (int16 RMS, about -40 dBFS) counts as sound.
LOUD_RMS = 300.0


class PhoneLine(Protocol):
    """What a scripted caller and a scorer need from a line."""

    label: str
    has_echo: bool
    transport: object  # a pipecat BaseTransport

    def say(self, pcm16k: np.ndarray) -> float:
        """Start speaking int16 16 kHz audio as the caller now; returns its duration."""

    def caller_busy(self) -> bool:
        """The caller's last audio is still playing."""

    def sink_loud_seconds(self, start: float, end: float) -> float:
        """Seconds of sound that reached the caller's ear between two monotonic times."""

    def sink_last_loud(self, before: float | None = None, after: float | None = None) -> float | None:
        """When sound last reached the caller's ear (before ``before``, if given); ``after``: only
        sound that ended after it counts (None if none did; a long call's record is not searched
        further back)."""

    def channels(self, t0: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        """(caller, ear): int16 16 kHz tracks from ``t0`` to ``end``."""

    def agent_input(self, t0: float, end: float) -> np.ndarray | None:
        """What the agent heard (after echo cancellation), where the line records it."""

    def played_chunks(self) -> list[tuple[float, bytes]]:
        """Every chunk the sink played, with its time (the simulated line only; else empty)."""

    def write_wavs(self, out: Path, t0: float) -> dict[str, Path]:
        """Write the call's recordings (timeline starting at ``t0``); name -> path."""

    def close(self) -> None:
        """Release the line; safe to call twice."""


def loud_seconds(pcm: np.ndarray, rate: int) -> float:
    """Seconds of 10 ms blocks louder than :data:`LOUD_RMS` in int16 audio."""
    return float(loud_blocks(pcm, rate).sum() * BLOCK_S)


def loud_onset(pcm: np.ndarray, rate: int) -> float:
    """Seconds from the start of int16 audio to its first loud 10 ms block (0 if none)."""
    loud = np.flatnonzero(loud_blocks(pcm, rate))
    return float(loud[0] * BLOCK_S) if loud.size else 0.0


def loud_blocks(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Which 10 ms blocks of int16 audio are louder than :data:`LOUD_RMS`."""
    block = int(rate * BLOCK_S)
    n = len(pcm) // block
    if n == 0:
        return np.zeros(0, dtype=bool)
    blocks = pcm[: n * block].astype(np.float32).reshape(n, block)
    return np.sqrt((blocks**2).mean(axis=1)) > LOUD_RMS


def timeline(pieces: list[tuple[float, np.ndarray]], rate: int, t0: float, end: float | None = None) -> np.ndarray:
    """Lay timestamped int16 pieces on a silent track from ``t0`` (to ``end``, else the last piece's end)."""
    if end is None:
        end = max((t + len(pcm) / rate for t, pcm in pieces), default=t0)
    track = np.zeros(max(0, int((end - t0) * rate)) + 1, dtype=np.int16)
    for t, pcm in pieces:
        start = int(round((t - t0) * rate))
        if start < 0:
            pcm, start = pcm[-start:], 0
        if start >= len(track):
            continue
        pcm = pcm[: len(track) - start]
        track[start : start + len(pcm)] = pcm
    return track


def write_wav(path: Path, track: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(track.astype(np.int16).tobytes())


class SimLine:
    """The simulated line (see module doc)."""

    has_echo = False

    def __init__(self, out_rate: int = 24000, why: str = "", line: LineModel | None = None,
                 max_recording_s: float = 3600.0):
        """``why``: the reason the PulseAudio rig is not used, for the label. ``line``: the caller's
        voice is band-limited and levelled as that line would (its echo is not simulated).
        ``max_recording_s``: how much of the call both channels keep (the latest)."""
        from transports.rig.simulated import SimulatedPhoneParams, SimulatedPhoneTransport

        self.out_rate = out_rate
        self.line = line
        self.label = "simulated line (no sound server, no echo path)" + (f" ({why})" if why else "")
        if line is not None:
            self.label += f", caller through the {line.name} line's {line.band}"
        self.transport = SimulatedPhoneTransport(
            SimulatedPhoneParams(audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=CALLER_RATE,
                                 audio_out_sample_rate=out_rate, max_recording_s=max_recording_s)
        )

    def say(self, pcm16k: np.ndarray) -> float:
        if self.line is not None:
            pcm16k = self.line.caller_audio(pcm16k, CALLER_RATE)
        return self.transport.say(pcm16k)

    def caller_busy(self) -> bool:
        return self.transport.caller.speaking

    def _played(self):
        return list(self.transport.loudspeaker.played)

    def sink_loud_seconds(self, start: float, end: float) -> float:
        total = 0.0
        for chunk in self._played():
            if chunk.t + chunk.duration <= start or chunk.t >= end:
                continue
            samples = np.frombuffer(chunk.pcm, dtype=np.int16)
            first = max(0, int((start - chunk.t) * chunk.sample_rate))
            last = min(len(samples), int((end - chunk.t) * chunk.sample_rate))
            total += loud_seconds(samples[first:last], chunk.sample_rate)
        return total

    def sink_last_loud(self, before: float | None = None, after: float | None = None) -> float | None:
        for chunk in reversed(self._played()):
            if after is not None and chunk.t + chunk.duration <= after:
                return None
            if before is not None and chunk.t >= before:
                continue
            samples = np.frombuffer(chunk.pcm, dtype=np.int16)
            if before is not None:
                samples = samples[: max(0, int((before - chunk.t) * chunk.sample_rate))]
            loud = np.flatnonzero(loud_blocks(samples, chunk.sample_rate))
            if loud.size:
                end = chunk.t + (loud[-1] + 1) * BLOCK_S
                return end if after is None or end > after else None
        return None

    def _caller_track(self, t0: float, end: float | None) -> np.ndarray:
        heard = [(t, np.frombuffer(pcm, dtype=np.int16)) for t, pcm in list(self.transport.caller.heard)]
        return timeline(heard, CALLER_RATE, t0, end)

    def _ear_track(self, t0: float, end: float | None) -> np.ndarray:
        return timeline([(c.t, np.frombuffer(c.pcm, dtype=np.int16)) for c in self._played()], self.out_rate, t0, end)

    def channels(self, t0: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        ear = self._ear_track(t0, end)
        return self._caller_track(t0, end), soxr.resample(ear, self.out_rate, CALLER_RATE).astype(np.int16)

    def agent_input(self, t0: float, end: float) -> np.ndarray | None:
        return None  # the caller channel is exactly what the agent was fed

    def played_chunks(self) -> list[tuple[float, bytes]]:
        return [(c.t, c.pcm) for c in self._played()]

    def write_wavs(self, out: Path, t0: float) -> dict[str, Path]:
        paths = {"caller": out / "caller.wav", "annie": out / "annie.wav"}
        write_wav(paths["caller"], self._caller_track(t0, None), CALLER_RATE)
        write_wav(paths["annie"], self._ear_track(t0, None), self.out_rate)
        return paths

    def close(self) -> None:
        pass


class RigLine:
    """The phone in a box: a private PulseAudio daemon with echo cancellation (see module doc)."""

    BUS = "callerbus"

    def __init__(self, out_rate: int = 24000, *, echo_path: bool = True, echo_latency_ms: int = 30,
                 caller_bus: bool = False, line: LineModel | None = None, canceller: Canceller = "pulse"):
        """Start the rig and the transport on it.

        Args:
            echo_path: Without ``line``: a plain ``module-loopback`` echo of ``echo_latency_ms``.
            line: A phone line model: the echo path and the caller's voice follow it.
            canceller: ``pulse``, ``aec3`` or ``off`` (see the module doc).
        """
        from transports.pulse import PulseAudioParams, PulseAudioTransport
        from transports.rig.pulse import PulseRig

        self.out_rate = out_rate
        self.line = line
        self.canceller = canceller
        self.has_echo = line.has_echo if line is not None else echo_path
        if line is not None:
            echo = (f"the {line.name} line: echo {line.echo_delay_ms:.0f} ms, {line.echo_return_loss_db} dB down, "
                    f"{line.band}" if line.has_echo else f"the {line.name} line: no echo")
        else:
            echo = f"{echo_latency_ms} ms echo path from the earpiece into the mic" if echo_path else "no echo path"
        self.label = f"PulseAudio rig ({CANCELLER_LABELS[canceller]}, {echo})"
        self._rig = PulseRig(echo_path=echo_path, echo_latency_ms=echo_latency_ms, line=line,
                             echo_cancel=canceller == "pulse")
        self._rig.start()
        self._recorders = []
        self._plays: list[tuple[object, np.ndarray]] = []
        self._device = PulseRig.MIC
        try:
            self._caller_rec = None
            if caller_bus:
                self._rig.pactl("load-module", "module-null-sink", f"sink_name={self.BUS}")
                self._rig.pactl("load-module", "module-loopback", f"source={self.BUS}.monitor",
                                f"sink={PulseRig.MIC}", "latency_msec=20")
                self._device = self.BUS
                self._caller_rec = self._record(f"{self.BUS}.monitor", CALLER_RATE)
            cancelled = canceller == "pulse"
            self.transport = PulseAudioTransport(
                PulseAudioParams(server=self._rig.server, source=PulseRig.SOURCE if cancelled else PulseRig.RAW_MIC,
                                 sink=PulseRig.SINK if cancelled else PulseRig.SPEAKER,
                                 audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=CALLER_RATE,
                                 audio_out_sample_rate=out_rate),
                echo_canceller=make_canceller(canceller, CALLER_RATE, keep_output=True),
            )
            # What the caller hears (the earpiece) and what the agent hears: the cancelled mic, or
            # (aec3) the raw mic, cancelled in the agent (kept by the transport's canceller).
            self._earpiece = self._record(PulseRig.SPEAKER_MONITOR, out_rate)
            self._agent_ear = self._record(PulseRig.SOURCE if cancelled else PulseRig.RAW_MIC, CALLER_RATE)
            self._raw_mic = self._agent_ear if not cancelled else self._record(PulseRig.RAW_MIC, CALLER_RATE)
        except BaseException:
            self.close()
            raise

    def _record(self, source: str, rate: int):
        recorder = self._rig.record(source, sample_rate=rate)
        self._recorders.append(recorder)
        return recorder

    def say(self, pcm16k: np.ndarray) -> float:
        if self.line is not None:
            pcm16k = self.line.caller_audio(pcm16k, CALLER_RATE)
        self._plays.append((self._rig.play(pcm16k, CALLER_RATE, device=self._device), pcm16k))
        return len(pcm16k) / CALLER_RATE

    def caller_busy(self) -> bool:
        return any(not playback._done.is_set() for playback, _ in self._plays[-2:])

    def _earpiece_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Loudness and end time of each 10 ms block recorded at the earpiece so far."""
        rec = self._earpiece.snapshot()
        n = len(rec.block_end_times)
        loud = loud_blocks(rec.samples[: n * rec.block_samples], rec.sample_rate)
        return loud, rec.block_end_times[: len(loud)]

    def sink_loud_seconds(self, start: float, end: float) -> float:
        loud, times = self._earpiece_blocks()
        return float((loud & (times > start) & (times <= end)).sum() * BLOCK_S)

    def sink_last_loud(self, before: float | None = None, after: float | None = None) -> float | None:
        loud, times = self._earpiece_blocks()
        if before is not None:
            loud = loud & (times < before)
        if after is not None:
            loud = loud & (times > after)
        return float(times[loud][-1]) if loud.any() else None

    @staticmethod
    def _track(recorder, t0: float, end: float | None) -> tuple[np.ndarray, int]:
        rec = recorder.snapshot()
        n = len(rec.block_end_times)
        if n == 0:
            return np.zeros(max(0, int(((end or t0) - t0) * rec.sample_rate)) + 1, dtype=np.int16), rec.sample_rate
        # Samples arrive continuously; the stream's start is best estimated from all block times.
        block_s = rec.block_samples / rec.sample_rate
        start = float(np.median(rec.block_end_times - block_s * np.arange(1, n + 1)))
        return timeline([(start, rec.samples[: n * rec.block_samples])], rec.sample_rate, t0, end), rec.sample_rate

    def _caller_track(self, t0: float, end: float | None) -> np.ndarray:
        if self._caller_rec is not None:
            return self._track(self._caller_rec, t0, end)[0]
        played = [(p.started_at, pcm.astype(np.int16)) for p, pcm in self._plays if p.started_at]
        return timeline(played, CALLER_RATE, t0, end)

    def channels(self, t0: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        ear, rate = self._track(self._earpiece, t0, end)
        return self._caller_track(t0, end), soxr.resample(ear, rate, CALLER_RATE).astype(np.int16)

    def agent_input(self, t0: float, end: float) -> np.ndarray | None:
        canceller = self.transport.echo_canceller
        if canceller is not None:  # what the in-process canceller gave the agent, at its capture times
            pieces = [(t, np.frombuffer(pcm, dtype=np.int16)) for t, pcm in list(canceller.output)]
            return timeline(pieces, CALLER_RATE, t0, end)
        return self._track(self._agent_ear, t0, end)[0]

    def raw_mic(self, t0: float, end: float) -> np.ndarray:
        """The raw mic (echo and caller, before any canceller), where the line records it."""
        return self._track(self._raw_mic, t0, end)[0]

    def played_chunks(self) -> list[tuple[float, bytes]]:
        return []

    def write_wavs(self, out: Path, t0: float) -> dict[str, Path]:
        paths = {"caller": out / "caller.wav", "annie": out / "annie.wav", "agent_heard": out / "agent_heard.wav"}
        write_wav(paths["caller"], self._caller_track(t0, None), CALLER_RATE)
        for name, recorder in (("annie", self._earpiece), ("agent_heard", self._agent_ear)):
            track, rate = self._track(recorder, t0, None)
            if name == "agent_heard" and self.transport.echo_canceller is not None:
                track = self.agent_input(t0, t0 + len(track) / rate)  # after the in-process canceller
            write_wav(paths[name], track, rate)
        return paths

    def close(self) -> None:
        recorders, self._recorders = self._recorders, []
        for recorder in recorders:
            recorder.stop()
        self._rig.stop()


def rig_unusable_reason() -> str | None:
    """None when the PulseAudio rig and transport can run here, else the reason they cannot."""
    for module in ("transports.pulse", "transports.rig.pulse"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not available"
    from transports.rig.pulse import pulseaudio_available

    if not pulseaudio_available():
        return "pulseaudio is not installed (apt-get install pulseaudio pulseaudio-utils)"
    return None


def open_line(out_rate: int, *, prefer_rig: bool = True, echo_path: bool = False, line: LineModel | None = None,
              canceller: Canceller = "pulse") -> PhoneLine:
    """The rig when it can run here (and ``prefer_rig``), else the simulated line.

    ``echo_path`` loops the earpiece back into the mic as a speakerphone would. Off by default:
    on a busy 2-core machine the webrtc canceller leaves enough of Annie's voice for Silero to
    hear her now and then, and with barge-in on she then interrupts herself. ``line`` makes the
    rig a phone line (its echo, band and levels; the simulated line applies only its band and
    levels to the caller), cancelled by ``canceller``.
    """
    if not prefer_rig:
        return SimLine(out_rate, "asked for", line=line)
    why = rig_unusable_reason()
    if why is None:
        from transports.rig.pulse import RigError

        try:
            return RigLine(out_rate, echo_path=echo_path, line=line, canceller=canceller)
        except RigError as e:
            logger.warning(f"the PulseAudio rig did not start, using the simulated line: {e}")
            why = "the PulseAudio rig did not start; see the log"
    return SimLine(out_rate, why, line=line)

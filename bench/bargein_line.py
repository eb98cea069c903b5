"""The phone lines the barge-in benchmark calls over, and their two recorded channels.

Each line gives the pipeline a transport, lets the caller speak, and afterwards hands back the two
channels Full-Duplex-Bench segments: the caller alone (``input``) and what reached the caller's
ear (``output``), both int16 at 16 kHz on one ``time.monotonic()`` timeline.

- :class:`RigLine`: the private PulseAudio rig (:class:`transports.pulse_rig.PulseRig`, webrtc
  echo cancellation, a 30 ms echo path from the speaker back into the microphone) and the
  PulseAudio transport. The caller plays into a private null sink ``callerbus`` that a loopback
  carries into the rig's microphone, so the caller's channel is recorded clean (its onset is a
  loopback latency *earlier* than at the microphone: stop latencies err long). Annie's channel
  is the speaker's monitor.
- :class:`SimLine`: :mod:`transports.simulated` (no sound server, no echo): the caller channel
  is exactly what the pipeline was fed, the output channel exactly what the sink played.
"""

from __future__ import annotations

import numpy as np
import soxr

RATE = 16000
OUT_RATE = 24000


def _timeline(pieces: list[tuple[float, np.ndarray]], rate: int, t0: float, end: float) -> np.ndarray:
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


class SimLine:
    """The simulated line (see module doc)."""

    label = "simulated line (transports/simulated.py: no sound server, no echo path)"
    has_echo = False

    def __init__(self):
        from transports.simulated import SimulatedPhoneParams, SimulatedPhoneTransport

        self.transport = SimulatedPhoneTransport(
            SimulatedPhoneParams(audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=RATE,
                                 audio_out_sample_rate=OUT_RATE)
        )

    def play(self, pcm16k: np.ndarray) -> None:
        self.transport.say(pcm16k)

    def caller_busy(self) -> bool:
        return self.transport.caller.speaking

    def channels(self, t0: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        """(caller, output) int16 16 kHz tracks from ``t0`` to ``end``."""
        heard = [(t, np.frombuffer(pcm, dtype=np.int16)) for t, pcm in list(self.transport.caller.heard)]
        caller = _timeline(heard, RATE, t0, end)
        played = [(c.t, np.frombuffer(c.pcm, dtype=np.int16)) for c in list(self.transport.loudspeaker.played)]
        out = _timeline(played, OUT_RATE, t0, end)
        return caller, soxr.resample(out, OUT_RATE, RATE).astype(np.int16)

    def played_chunks(self) -> list[tuple[float, bytes]]:
        return [(c.t, c.pcm) for c in list(self.transport.loudspeaker.played)]

    def close(self) -> None:
        pass


class RigLine:
    """The PulseAudio rig (see module doc)."""

    label = "PulseAudio rig (transports/pulse_rig.py: webrtc AEC, 30 ms echo path) + transports/pulse.py"
    has_echo = True
    BUS = "callerbus"

    def __init__(self):
        from transports.pulse import PulseAudioParams, PulseAudioTransport
        from transports.pulse_rig import PulseRig

        self._rig = PulseRig()
        self._rig.start()
        self._recorders = []
        self._plays = []
        try:
            self._rig.pactl("load-module", "module-null-sink", f"sink_name={self.BUS}")
            self._rig.pactl("load-module", "module-loopback", f"source={self.BUS}.monitor", f"sink={PulseRig.MIC}",
                            "latency_msec=20")
            self.transport = PulseAudioTransport(
                PulseAudioParams(server=self._rig.server, source=PulseRig.SOURCE, sink=PulseRig.SINK,
                                 audio_in_enabled=True, audio_out_enabled=True, audio_in_sample_rate=RATE,
                                 audio_out_sample_rate=OUT_RATE)
            )
            self._caller_rec = self._rig.record(f"{self.BUS}.monitor", sample_rate=RATE)
            self._recorders.append(self._caller_rec)
            self._ear_rec = self._rig.record(PulseRig.SPEAKER_MONITOR, sample_rate=RATE)
            self._recorders.append(self._ear_rec)
            # What the agent hears (the cancelled mic), to tell the canceller's share of a late
            # detection from the pipeline's.
            self._source_rec = self._rig.record(PulseRig.SOURCE, sample_rate=RATE)
            self._recorders.append(self._source_rec)
        except BaseException:
            self.close()
            raise

    def play(self, pcm16k: np.ndarray) -> None:
        self._plays.append(self._rig.play(pcm16k, RATE, device=self.BUS))

    def caller_busy(self) -> bool:
        return any(not p._done.is_set() for p in self._plays[-2:])

    @staticmethod
    def _track(recorder, t0: float, end: float) -> np.ndarray:
        rec = recorder.snapshot()
        n = len(rec.block_end_times)
        if n == 0:
            return np.zeros(max(0, int((end - t0) * RATE)) + 1, dtype=np.int16)
        # Samples arrive continuously; the stream's start is best estimated from all block times.
        block_s = rec.block_samples / rec.sample_rate
        start = float(np.median(rec.block_end_times - block_s * np.arange(1, n + 1)))
        return _timeline([(start, rec.samples[: n * rec.block_samples])], RATE, t0, end)

    def channels(self, t0: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        return self._track(self._caller_rec, t0, end), self._track(self._ear_rec, t0, end)

    def agent_input(self, t0: float, end: float) -> np.ndarray:
        """The echo-cancelled mic (the agent's input), int16 16 kHz from ``t0`` to ``end``."""
        return self._track(self._source_rec, t0, end)

    def played_chunks(self) -> list[tuple[float, bytes]]:
        return []

    def close(self) -> None:
        recorders, self._recorders = self._recorders, []
        for recorder in recorders:
            recorder.stop()
        self._rig.stop()


def rig_unusable_reason() -> str | None:
    """None when the rig and the PulseAudio transport can run here, else why not."""
    try:
        import transports.pulse  # noqa: F401
        from transports.pulse_rig import pulseaudio_available
    except ImportError as e:
        return f"the PulseAudio transport or rig cannot be imported ({e})"
    if not pulseaudio_available():
        return "pulseaudio/pactl are not installed"
    return None

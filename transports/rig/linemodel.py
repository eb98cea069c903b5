"""What a real phone line does to audio: one model for the tests, the bench and the demo.

The box is a Bluetooth hands-free unit for the caller's phone (DESIGN.md section 9). Everything the
agent hears comes up that link, band-limited by its codec (HFP narrowband, CVSD 8 kHz: 300-3400 Hz;
wideband, mSBC 16 kHz: up to 7 kHz): the caller's voice, the caller's room, and Annie's own voice
coming back as echo from the far phone, 150-400 ms late (one-way network delays of 70-200 ms each
way), quieter by the echo return loss (a handset at the ear: ~45 dB; a speakerphone: a few dB),
and mildly distorted by the handset's loudspeaker.

:class:`LineModel` holds one line's settings; :data:`PRESETS` names the ones the bench runs.
:class:`EchoPath` turns Annie's played audio into the echo at the agent's microphone, block by
block (stateful filters, a delay line), and :meth:`LineModel.caller_audio` turns a caller's clip
into what the line delivers. Pure numpy/scipy, no I/O: :mod:`transports.rig.echo_bridge` puts the
echo path into the PulseAudio rig, and tests check it on tones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy.signal import butter, sosfilt, sosfilt_zi

RATE = 16000
# The level callers' clips are made at (bench/bargein_audio.py): the line moves it to its own.
NOMINAL_CALLER_DBFS = -24.0
Band = Literal["narrowband", "wideband"]
Room = Literal["quiet", "tv", "second_voice", "babble"]
# Pass bands of the two HFP codecs (CVSD at 8 kHz, mSBC at 16 kHz).
BAND_HZ: dict[str, tuple[float, float]] = {"narrowband": (300.0, 3400.0), "wideband": (80.0, 7000.0)}
ROOMS: tuple[str, ...] = ("quiet", "tv", "second_voice", "babble")
# Words for the caller's room (not addressed to Annie).
_ROOM_TALK = (
    "and then she told me the whole story about the garden party last summer",
    "the market closes early on sundays so we should leave before noon",
    "did you see the game last night it went into extra time again",
    "tomorrow will be cloudy with a chance of rain in the afternoon",
)


@dataclass(frozen=True)
class LineModel:
    """One phone line's settings.

    Attributes:
        name: The preset's name, for reports.
        echo_delay_ms: From Annie's sample at the sink to its echo at the agent's mic, 0-500.
        echo_return_loss_db: How far below Annie's level her echo arrives, 0-50 (speakerphone to
            handset); ``None``: no echo at all.
        band: The Bluetooth codec's band, applied to everything the agent hears.
        clip_dbfs: Knee of the far handset's soft clipping (``a * tanh(x / a)``) on the echo;
            ``None``: linear.
        caller_dbfs: The caller's speech level at the agent's mic (RMS over active speech).
        room: The caller's room, heard all call long under the caller.
        room_snr_db: How far below the caller's level the room is.
    """

    name: str = "custom"
    echo_delay_ms: float = 200.0
    echo_return_loss_db: float | None = 40.0
    band: Band = "narrowband"
    clip_dbfs: float | None = -12.0
    caller_dbfs: float = -24.0
    room: Room = "quiet"
    room_snr_db: float = 15.0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.echo_delay_ms <= 500.0:
            raise ValueError(f"echo_delay_ms must be 0-500 (got {self.echo_delay_ms})")
        if self.echo_return_loss_db is not None and not 0.0 <= self.echo_return_loss_db <= 50.0:
            raise ValueError(f"echo_return_loss_db must be 0-50 or None (got {self.echo_return_loss_db})")
        if self.band not in BAND_HZ:
            raise ValueError(f"band must be one of {', '.join(BAND_HZ)} (got {self.band!r})")
        if self.room not in ROOMS:
            raise ValueError(f"room must be one of {', '.join(ROOMS)} (got {self.room!r})")
        if not -60.0 <= self.caller_dbfs <= 0.0:
            raise ValueError(f"caller_dbfs must be -60..0 (got {self.caller_dbfs})")

    @property
    def has_echo(self) -> bool:
        return self.echo_return_loss_db is not None

    @property
    def band_hz(self) -> tuple[float, float]:
        return BAND_HZ[self.band]

    def echo_vs_caller_db(self, annie_dbfs: float) -> float | None:
        """How loud the echo is against the caller (positive: louder), for Annie at ``annie_dbfs``."""
        if self.echo_return_loss_db is None:
            return None
        return annie_dbfs - self.echo_return_loss_db - self.caller_dbfs

    def with_(self, **changes: object) -> LineModel:
        return replace(self, **changes)

    def band_filter(self, rate: int = RATE) -> BandFilter:
        return BandFilter(self.band_hz, rate)

    def caller_audio(self, pcm: np.ndarray, rate: int = RATE) -> np.ndarray:
        """A caller's int16 clip as the line delivers it: band-limited, moved to :attr:`caller_dbfs`.

        Clips are made at :data:`NOMINAL_CALLER_DBFS`; the line shifts them all by the same gain,
        so a clip made 3 dB louder than nominal stays 3 dB louder than :attr:`caller_dbfs`.
        """
        gain = 10 ** ((self.caller_dbfs - NOMINAL_CALLER_DBFS) / 20)
        x = self.band_filter(rate).process(pcm.astype(np.float64) * (gain / 32768.0))
        return to_int16(x)

    def room_audio(self, seconds: float, rng: np.random.Generator, rate: int = RATE) -> np.ndarray:
        """The caller's room for ``seconds`` (int16, band-limited), :attr:`room_snr_db` below the caller."""
        n = int(seconds * rate)
        if self.room == "quiet":
            return np.zeros(n, dtype=np.int16)
        x = _room_bed(self.room, n, rng, rate)
        x = at_level(x, self.caller_dbfs - self.room_snr_db)
        return to_int16(self.band_filter(rate).process(x))


class BandFilter:
    """A streaming band-pass (8th-order Butterworth as second-order sections, state kept)."""

    def __init__(self, band_hz: tuple[float, float], rate: int = RATE):
        low, high = band_hz
        high = min(high, 0.45 * rate)
        self._sos = butter(4, [low, high], btype="bandpass", fs=rate, output="sos")
        self._zi = sosfilt_zi(self._sos) * 0.0

    def process(self, x: np.ndarray) -> np.ndarray:
        y, self._zi = sosfilt(self._sos, x, zi=self._zi)
        return y


class EchoPath:
    """Annie's played audio -> her echo at the agent's mic, one block at a time (float, full scale 1).

    The order is the line's: the far handset's loudspeaker (soft clipping) and coupling (the
    echo return loss), then the way back through the network (delay) and the Bluetooth codec
    (band). ``extra_delay_ms`` lets a caller that adds its own latency (the rig's bridge) ask for
    less delay here, so the whole path has the model's delay.
    """

    def __init__(self, model: LineModel, rate: int = RATE, extra_delay_ms: float = 0.0):
        if not model.has_echo:
            raise ValueError(f"line {model.name!r} has no echo path")
        self.model = model
        self.rate = rate
        self._gain = 10 ** (-(model.echo_return_loss_db or 0.0) / 20)
        self._knee = None if model.clip_dbfs is None else 10 ** (model.clip_dbfs / 20)
        self._band = model.band_filter(rate)
        delay = max(0.0, model.echo_delay_ms - extra_delay_ms)
        self.delay_samples = int(round(delay * rate / 1000))
        self._line = np.zeros(self.delay_samples)

    def process(self, x: np.ndarray) -> np.ndarray:
        """The echo of one block of Annie's audio (same length, delayed by the model's delay)."""
        if self._knee is not None:
            x = self._knee * np.tanh(x / self._knee)
        x = self._band.process(x * self._gain)
        if self.delay_samples == 0:
            return x
        joined = np.concatenate([self._line, x])
        self._line = joined[len(x):]
        return joined[: len(x)]


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def active_rms(x: np.ndarray, block: int = 320) -> float:
    """RMS over the blocks within 40 dB of the loudest (the active part of speech)."""
    n = len(x) // block
    if n == 0:
        return float(np.sqrt(np.mean(x**2))) if len(x) else 0.0
    energy = (x[: n * block].reshape(n, block) ** 2).mean(axis=1)
    active = energy > energy.max() * 1e-4
    return float(np.sqrt(energy[active].mean())) if active.any() else 0.0


def at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = active_rms(x)
    return x * (10 ** (dbfs / 20) / rms) if rms > 0 else x


def _room_bed(room: str, n: int, rng: np.random.Generator, rate: int) -> np.ndarray:
    """A room's sound, float, arbitrary level: a TV (speech over a chord), voices, babble."""
    from transports.rig.audio import synth_speech

    def talk(voice: str, wpm: int, k: int) -> np.ndarray:
        text = " ".join(_ROOM_TALK[(k + i) % len(_ROOM_TALK)] for i in range(2))
        x = synth_speech(text, rate, voice=voice, wpm=wpm).astype(np.float64) / 32768.0
        return np.resize(at_level(x, -20.0), n)  # repeats to fill the call

    if room == "second_voice":
        return talk("en-us+f2", 160, 0)
    if room == "babble":
        return sum(np.roll(talk(v, w, k), int(rng.integers(0, n))) for k, (v, w) in
                   enumerate((("en-us+m1", 150), ("en-us+f4", 170), ("en-gb+m3", 145), ("en-us+f1", 160))))
    t = np.arange(n) / rate
    music = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.5 * t))
    return talk("en-gb+m1", 175, 1) + at_level(music, -30.0)


# The lines the bench runs by default, and a few more for the demo and experiments. Annie plays at
# about -17 dBFS (Piper), the caller speaks at -24 dBFS.
PRESETS: dict[str, LineModel] = {
    p.name: p
    for p in (
        LineModel("handset", echo_delay_ms=200, echo_return_loss_db=45, band="narrowband",
                  description="handset at the ear, narrowband: the phone's own coupling loss, echo ~38 dB below the caller"),
        LineModel("speakerphone", echo_delay_ms=250, echo_return_loss_db=6, band="wideband",
                  description="loud speakerphone, wideband: echo about as loud as the caller (~1 dB above)"),
        LineModel("network_delay", echo_delay_ms=400, echo_return_loss_db=20, band="narrowband",
                  description="long network round trip (400 ms), narrowband: echo ~13 dB below the caller"),
        LineModel("rig_loopback", echo_delay_ms=30, echo_return_loss_db=0, band="wideband", clip_dbfs=None,
                  description="the old rig's 30 ms digital loopback: echo louder than the caller"),
        LineModel("handset_tv", echo_delay_ms=200, echo_return_loss_db=45, band="narrowband", room="tv",
                  room_snr_db=15,
                  description="handset, a TV 15 dB below the caller"),
        LineModel("no_echo", echo_return_loss_db=None, band="wideband",
                  description="no echo at all (the simulated line's old assumption)"),
    )
}
DEFAULT_PRESETS: tuple[str, ...] = ("handset", "speakerphone", "network_delay")


def preset(name: str) -> LineModel:
    """The named preset; ``ValueError`` naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown line preset {name!r}; choose from {', '.join(PRESETS)}") from None

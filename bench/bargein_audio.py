"""The caller's side of the barge-in benchmark: speech, backchannels, coughs and room noise.

Everything is synthesized here (espeak-ng for voices, numpy for noise), never downloaded. Audio is
int16 mono at 16 kHz, the caller's microphone rate. Levels are RMS over the active part of a
clip in dBFS; the caller speaks at :data:`CALLER_LEVEL_DBFS` give or take a few dB per trial, and
room noise is placed at an SNR relative to that nominal caller level.
"""

from __future__ import annotations

import functools
import io
import subprocess
import wave

import numpy as np
import soxr

RATE = 16000
CALLER_LEVEL_DBFS = -24.0

# (espeak-ng voice, words per minute): the callers of the benchmark.
CALLER_VOICES = (("en-us+m3", 150), ("en-us+f3", 165), ("en-gb+m2", 140), ("en-us+f5", 175), ("en+m7", 155))
# The callers whose variant no room voice uses (:func:`room_noise`: m1, f2, m3, f4, f3, m5): one
# per call when the caller-voice gate is measured, so the TV is never the caller's own voice.
GATE_CALLERS = (2, 3, 4)
INTERRUPTIONS = (
    "Wait, stop please. What time is it?",
    "Hold on, I need to ask you something else.",
    "Sorry, can you call my daughter for me?",
    "No, no, that is not what I asked you.",
    "Excuse me, is the doctor coming today?",
    "Stop for a moment, where are my glasses?",
)
BACKCHANNELS = ("mm-hm", "okay", "yeah", "right", "uh-huh", "I see")
QUESTIONS = (
    "What is the weather like today?",
    "What day is it today?",
    "Can you remind me when lunch is?",
    "Who is coming to visit this week?",
)
# Words for babble, TV and a second voice in the room (not addressed to Annie).
ROOM_TALK = (
    "and then she told me the whole story about the garden party last summer",
    "the market closes early on sundays so we should leave before noon",
    "did you see the game last night it went into extra time again",
    "tomorrow will be cloudy with a chance of rain in the afternoon",
    "put the kettle on would you I will be there in a minute",
    "the news tonight covers the election and the storm in the north",
)
NOISE_KINDS = ("babble", "tv", "second_voice")
BURST_KINDS = ("cough", "door", "burst")


@functools.lru_cache(maxsize=128)
def _espeak(text: str, voice: str, wpm: int) -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(wpm), "--stdout", text], capture_output=True, check=True, timeout=30
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:  # espeak-ng writes a placeholder size; wave copes
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes() or 10**9), dtype=np.int16)
    return soxr.resample(pcm.astype(np.float32) / 32768.0, rate, RATE).astype(np.float32)


def active_rms(x: np.ndarray, block: int = 320) -> float:
    """RMS over the 20 ms blocks within 30 dB of the loudest (the clip's active part)."""
    n = len(x) // block
    if n == 0:
        return float(np.sqrt(np.mean(x**2))) if len(x) else 0.0
    energies = (x[: n * block].reshape(n, block) ** 2).mean(axis=1)
    loud = energies[energies > energies.max() * 1e-3]
    return float(np.sqrt(loud.mean())) if loud.size else 0.0


def at_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    """Scale float audio so its active RMS is ``dbfs``; returns int16."""
    rms = active_rms(x)
    gain = 10 ** (dbfs / 20) / rms if rms > 0 else 0.0
    return np.clip(x * gain * 32768.0, -32768, 32767).astype(np.int16)


def pad(x: np.ndarray, lead_s: float = 0.0, tail_s: float = 0.05) -> np.ndarray:
    return np.concatenate([np.zeros(int(lead_s * RATE), x.dtype), x, np.zeros(int(tail_s * RATE), x.dtype)])


def speech(text: str, voice_index: int = 0, level_dbfs: float = CALLER_LEVEL_DBFS) -> np.ndarray:
    """The caller saying ``text`` in one of :data:`CALLER_VOICES`, int16 at ``level_dbfs``."""
    voice, wpm = CALLER_VOICES[voice_index % len(CALLER_VOICES)]
    return pad(at_level(_espeak(text, voice, wpm), level_dbfs))


def _band(noise: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(noise)
    freqs = np.fft.rfftfreq(len(noise), 1 / RATE)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, len(noise)).astype(np.float32)


def burst(kind: str, rng: np.random.Generator, level_dbfs: float) -> np.ndarray:
    """A non-speech sound: a cough (two voiced-noise bursts), a door (a thump), or a noise burst."""
    if kind == "cough":
        parts = []
        for length in (rng.uniform(0.12, 0.2), rng.uniform(0.1, 0.16)):
            n = int(length * RATE)
            env = np.minimum(1.0, np.arange(n) / (0.01 * RATE)) * np.exp(-np.arange(n) / (0.06 * RATE))
            parts += [_band(rng.standard_normal(n).astype(np.float32), 300, 3500) * env,
                      np.zeros(int(rng.uniform(0.06, 0.12) * RATE), np.float32)]
        x = np.concatenate(parts)
    elif kind == "door":
        n = int(0.4 * RATE)
        x = _band(rng.standard_normal(n).astype(np.float32), 40, 600) * np.exp(-np.arange(n) / (0.05 * RATE))
    elif kind == "burst":
        n = int(rng.uniform(0.2, 0.35) * RATE)
        x = rng.standard_normal(n).astype(np.float32) * np.hanning(n).astype(np.float32) ** 0.3
    else:
        raise ValueError(f"unknown burst kind {kind!r}; use one of {', '.join(BURST_KINDS)}")
    return pad(at_level(x, level_dbfs))


def room_noise(kind: str, rng: np.random.Generator, snr_db: float, seconds: float = 2.5) -> np.ndarray:
    """Babble, a TV (speech over music) or a second voice in the room, at ``snr_db`` below the
    nominal caller level, ``seconds`` long with 50 ms fades."""
    n = int(seconds * RATE)

    def talk(i: int, voice: str, wpm: int) -> np.ndarray:
        x = _espeak(ROOM_TALK[i % len(ROOM_TALK)], voice, wpm)
        x = np.tile(x, int(np.ceil(n / len(x))) + 1)
        start = int(rng.integers(0, len(x) - n))
        seg = x[start : start + n]
        return seg / (active_rms(seg) or 1.0)

    first = int(rng.integers(0, len(ROOM_TALK)))
    if kind == "babble":
        voices = (("en-us+m1", 160), ("en-us+f2", 170), ("en-gb+m3", 150), ("en-us+f4", 180))
        x = sum(talk(first + i, v, w) for i, (v, w) in enumerate(voices))
    elif kind == "tv":
        t = np.arange(n) / RATE
        chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
        x = talk(first, "en-gb+f3", 170) + 0.5 * chord.astype(np.float32) / np.sqrt(1.5)
    elif kind == "second_voice":
        x = talk(first, "en-us+m5", 160)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; use one of {', '.join(NOISE_KINDS)}")
    fade = int(0.05 * RATE)
    env = np.ones(n, np.float32)
    env[:fade] = np.linspace(0, 1, fade)
    env[-fade:] = np.linspace(1, 0, fade)
    return at_level(x.astype(np.float32) * env, CALLER_LEVEL_DBFS - snr_db)

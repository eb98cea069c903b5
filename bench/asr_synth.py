"""A small manifest of synthesized phone-call sentences with known text (nothing downloaded).

    python -m bench.asr_synth --out DIR        # DIR/manifest.jsonl and DIR/*.wav

Voices: Piper's ``en_US-joe-medium`` (neural; the ``demo`` extra) where it is installed, and
three espeak-ng voices (formant synthesis: clear but robotic). Sentences are what a household
says to Annie, without numbers (so digit-versus-word spelling cannot count as an error). The
audio is 16 kHz mono 16-bit, trimmed to the speech (100 ms before it, 20 ms after), so the end
of the file is the end of speech. Clean audio: the bench puts it through the phone band itself
(``--lines``). Synthetic voices are easier than people on a phone: a WER here is a floor, and
a comparison between backends, not a figure for real calls.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench.asr_manifest import SAMPLE_RATE, load_audio, write_manifest

SENTENCES = [
    "Hello Annie, could you remind me to call the pharmacy tomorrow morning?",
    "Please tell my daughter that dinner will be ready after the news.",
    "Is the plumber still coming this afternoon or did he cancel?",
    "I would like to order more of the blue tablets for my knee.",
    "Can you read me the weather for the weekend, please?",
    "My grandson wants to know whether the garden party is still on.",
    "Put the dentist appointment on the calendar for next Thursday.",
    "Thank you, that is all for now, goodbye.",
]
ESPEAK_VOICES = [("en-us", 155), ("en-gb+f3", 150), ("en-us+m3", 165)]


class SynthUnavailable(RuntimeError):
    """Neither espeak-ng nor Piper can speak here; the message says what to install."""


def trim_to_speech(samples: np.ndarray, lead_ms: int = 100, tail_ms: int = 20, floor_db: float = 40.0) -> np.ndarray:
    """Cut silence outside the speech: 10 ms frames quieter than the loudest by ``floor_db``."""
    hop = SAMPLE_RATE // 100
    frames = samples[: samples.size // hop * hop].reshape(-1, hop)
    level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    loud = np.flatnonzero(level > level.max() - floor_db)
    if loud.size == 0:
        return samples
    start = max(0, loud[0] * hop - SAMPLE_RATE * lead_ms // 1000)
    end = min(samples.size, (loud[-1] + 1) * hop + SAMPLE_RATE * tail_ms // 1000)
    return samples[start:end]


def _espeak(text: str, voice: str, speed: int, tmp: Path) -> np.ndarray:
    raw = tmp / "espeak.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True, capture_output=True, timeout=60)
    return load_audio(raw)


def _voices() -> list[tuple[str, object]]:
    """(label, speak(text, tmp) -> float32 16 kHz) for every voice available here."""
    from agent.demo.standins.piper_server import PiperSynthesizer, joe_voice_path, piper_available

    voices: list[tuple[str, object]] = []
    if piper_available():
        piper = PiperSynthesizer(joe_voice_path())

        def speak_piper(text: str, _tmp: Path, synth=piper) -> np.ndarray:
            import soxr

            pcm = np.frombuffer(synth.speak(text), dtype=np.int16).astype(np.float32) / 32768
            return soxr.resample(pcm, 24000, SAMPLE_RATE).astype(np.float32)

        voices.append(("piper-joe", speak_piper))
    if shutil.which("espeak-ng"):
        for voice, speed in ESPEAK_VOICES:
            voices.append((f"espeak-{voice.replace('+', '-')}", lambda text, tmp, v=voice, s=speed: _espeak(text, v, s, tmp)))
    if not voices:
        raise SynthUnavailable("no speech synthesizer here: install espeak-ng (apt-get install espeak-ng) or the demo extra (Piper)")
    return voices


def synthesize_manifest(out: Path, count: int = len(SENTENCES)) -> Path:
    """Speak the first ``count`` sentences (voices in turn) into ``out``; the manifest's path."""
    import soundfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    voices = _voices()
    rows = []
    with tempfile.TemporaryDirectory(prefix="asr-synth-") as tmp:
        for i, text in enumerate(SENTENCES[:count]):
            label, speak = voices[i % len(voices)]
            audio = trim_to_speech(speak(text, Path(tmp)))
            path = out / f"{i:02d}_{label}.wav"
            soundfile.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16")
            rows.append({"audio_filepath": str(path.resolve()), "text": text, "duration": round(audio.size / SAMPLE_RATE, 3), "voice": label})
    return write_manifest(out / "manifest.jsonl", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=len(SENTENCES), help=f"sentences (at most {len(SENTENCES)})")
    args = parser.parse_args()
    print(f"wrote {synthesize_manifest(args.out, args.count)}")


if __name__ == "__main__":
    main()

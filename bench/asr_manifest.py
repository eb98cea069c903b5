"""NeMo-style JSON-lines manifests for the ASR bench: one utterance a line.

    {"audio_filepath": "clips/0001.wav", "text": "call my daughter", "duration": 1.9}

``audio_filepath`` may be absolute or relative to the manifest's folder; ``duration`` is
optional (the audio's own length is used). Any format soundfile reads (WAV, FLAC, OGG) at any
rate; stereo is mixed down; everything is resampled to 16 kHz mono float32. A line that cannot be
used (bad JSON, no path or text, a missing, unreadable or empty file) is skipped and reported as
:class:`Skipped` with its line number, file name and reason; nothing here raises for bad input
except a missing or unreadable manifest itself.

A LibriSpeech split (e.g. test-clean, unpacked from openslr.org/12) becomes a manifest with

    python -m bench.asr_manifest librispeech LibriSpeech/test-clean test_clean.jsonl
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Utterance:
    key: str  # file name, or "line N" where the name is not known
    path: Path
    text: str
    audio: np.ndarray  # float32, 16 kHz mono

    @property
    def seconds(self) -> float:
        return self.audio.size / SAMPLE_RATE


@dataclass(frozen=True)
class Skipped:
    line: int
    name: str
    reason: str

    def __str__(self) -> str:
        return f"manifest line {self.line} ({self.name}): {self.reason}"


class AudioError(Exception):
    """An audio file that cannot be read; the message says why."""


def load_audio(path: Path) -> np.ndarray:
    """The file's audio as 16 kHz mono float32; :class:`AudioError` if it is missing or unreadable."""
    if not path.is_file():
        raise AudioError("file not found")
    try:
        import soundfile

        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioError(f"unreadable audio ({type(e).__name__}: {str(e).strip() or 'no detail'})") from e
    samples = samples.mean(axis=1)
    if samples.size == 0:
        raise AudioError("no audio samples")
    if rate != SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, rate, SAMPLE_RATE)
    return np.ascontiguousarray(samples, dtype=np.float32)


def load_manifest(manifest: Path, limit: int | None = None) -> tuple[list[Utterance], list[Skipped]]:
    """The usable utterances of ``manifest`` (at most ``limit``) and the lines skipped, in order."""
    utterances: list[Utterance] = []
    skipped: list[Skipped] = []
    for number, line in enumerate(Path(manifest).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(utterances) >= limit:
            break
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append(Skipped(number, f"line {number}", f"not JSON ({e.msg})"))
            continue
        raw_path = entry.get("audio_filepath") if isinstance(entry, dict) else None
        text = entry.get("text") if isinstance(entry, dict) else None
        if not isinstance(raw_path, str) or not raw_path:
            skipped.append(Skipped(number, f"line {number}", "no audio_filepath"))
            continue
        name = Path(raw_path).name
        if not isinstance(text, str) or not text.strip():
            skipped.append(Skipped(number, name, "no reference text"))
            continue
        path = Path(raw_path).expanduser()
        path = path if path.is_absolute() else Path(manifest).parent / path
        try:
            audio = load_audio(path)
        except AudioError as e:
            skipped.append(Skipped(number, name, f"{e} at {path}"))
            continue
        utterances.append(Utterance(name, path, text.strip(), audio))
    return utterances, skipped


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """Write NeMo JSON lines (paths relative to the manifest's folder where they lie under it)."""
    path = Path(path)
    lines = []
    for row in rows:
        audio = Path(row["audio_filepath"])
        if audio.is_absolute() and audio.is_relative_to(path.parent.resolve()):
            audio = audio.relative_to(path.parent.resolve())
        lines.append(json.dumps({**row, "audio_filepath": str(audio)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def librispeech_manifest(split: Path, out: Path) -> Path:
    """A manifest of a LibriSpeech split (``SPEAKER/CHAPTER/*.trans.txt`` beside the FLAC files)."""
    rows = []
    for transcript in sorted(Path(split).glob("*/*/*.trans.txt")):
        for line in transcript.read_text(encoding="utf-8").splitlines():
            key, _, text = line.strip().partition(" ")
            if key and text:
                rows.append({"audio_filepath": str((transcript.parent / f"{key}.flac").resolve()), "text": text.lower()})
    if not rows:
        raise SystemExit(f"No LibriSpeech transcripts (SPEAKER/CHAPTER/*.trans.txt) under {split}.")
    return write_manifest(out, rows)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "librispeech":
        raise SystemExit("usage: python -m bench.asr_manifest librispeech SPLIT_DIR OUT.jsonl")
    print(f"wrote {librispeech_manifest(Path(sys.argv[2]), Path(sys.argv[3]))}")

"""How the Whisper fallback's "no speech" score separates the caller's words from noise.

Pipecat's ``WhisperSTTService`` drops every segment whose ``no_speech_prob`` is at or above its
threshold (pipecat's default 0.4). A dropped segment is a caller turn with no words: the question
goes unanswered. This runs the bundled ``tiny.en`` on the benchmark's own sounds (espeak-ng
caller phrases in three voices, backchannels, coughs, doors, noise bursts, room noise; see
``bench/bargein_audio.py``), each with 0.5 s of silence before it as the VAD pre-roll gives, and
prints each transcript with its score and, per threshold, how many utterances would be lost and
how many noise transcripts would get through. Writes ``bench/results/whisper_no_speech.json``.

    python -m bench.whisper_no_speech
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench import bargein_audio as audio

RESULTS = Path(__file__).resolve().parent / "results"
PHRASES = (
    "Please tell me a story.", "What is the weather like today?", "Excuse me, is the doctor coming today?",
    "Yes.", "No.", "Call my daughter.", "What time is it?", "Wait, stop please.",
    "Hold on, I need to ask you something else.", "Sorry, can you call my daughter?",
    "No, no, that is not what I asked.",
)
BACKCHANNELS = ("mm-hm", "okay", "I see", "yeah", "uh-huh", "right")
THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8)


def sounds(rng: np.random.Generator) -> list[tuple[str, str, np.ndarray]]:
    """(kind, label, int16 audio at 16 kHz): kind is "speech" (words that must get through) or "noise"."""
    out = [("speech", f"voice {v}: {p}", audio.speech(p, v)) for v in range(3) for p in PHRASES]
    out += [("speech", f"backchannel: {b}", audio.speech(b, 0)) for b in BACKCHANNELS]
    out += [("noise", f"{k} {i}", audio.burst(k, rng, -18.0)) for k in audio.BURST_KINDS for i in range(4)]
    out += [("noise", f"room {k} {i}", audio.room_noise(k, rng, 0.0)) for k in ("babble",) for i in range(2)]
    return out


def main() -> None:
    from faster_whisper import WhisperModel

    from processors.whisper_stt import NO_SPEECH_PROB, default_whisper_model_path

    model = WhisperModel(str(default_whisper_model_path()), device="cpu", compute_type="default")
    rows = []
    for kind, label, x in sounds(np.random.default_rng(0)):
        x = np.concatenate([np.zeros(8000, np.int16), x.astype(np.int16), np.zeros(3200, np.int16)])
        segments = list(model.transcribe(x.astype(np.float32) / 32768, language="en")[0])
        score = min((s.no_speech_prob for s in segments), default=None)
        text = " ".join(s.text.strip() for s in segments)
        rows.append({"kind": kind, "label": label, "text": text, "no_speech_prob": score})
        print(f"{kind:6s} {label:52s} {score if score is None else round(score, 2)!s:>5s}  {text}", flush=True)
    speech = [r["no_speech_prob"] for r in rows if r["kind"] == "speech"]
    noise = [r["no_speech_prob"] for r in rows if r["kind"] == "noise" and r["no_speech_prob"] is not None]
    table = []
    for t in THRESHOLDS:
        lost = sum(1 for s in speech if s is None or s >= t)
        through = sum(1 for s in noise if s < t)
        table.append({"threshold": t, "speech_lost": lost, "speech_total": len(speech),
                      "noise_transcripts_through": through, "noise_total": sum(r["kind"] == "noise" for r in rows)})
        print(f"threshold {t}: {lost} of {len(speech)} utterances lost, {through} noise transcripts through"
              f"{'   <- the agent' if t == NO_SPEECH_PROB else ''}")
    valid = [s for s in speech if s is not None]
    print(f"speech no_speech_prob: min {min(valid):.2f}, median {float(np.median(valid)):.2f}, max {max(valid):.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "whisper_no_speech.json").write_text(json.dumps({"rows": rows, "thresholds": table}, indent=1))


if __name__ == "__main__":
    main()

"""The caller-voice gate's own scores: does it tell the caller from the TV, another person and Annie?

Callers and other voices are espeak-ng variants (several callers, so the gate is not tuned to one
voice); Annie is Piper ``en_US-joe-medium`` where installed. Each caller is enrolled from three
sentences as the agent does (her speech while Annie is silent); then stretches of the length a
barge-in decision has (``--seconds``) are scored against her and Annie:

- the caller herself, alone and with the TV or a second voice underneath (20/10/5/0 dB below her);
- the TV / a second voice alone (what stops Annie today when the caller is silent);
- Annie's own voice (her echo), attenuated.

Reports per stretch length: the score distributions (median, p5, p95), the equal error rate of
caller against not-caller, and with the default thresholds how often each kind got each verdict.
Optionally through the phone band (``--band narrow``: 8 kHz, 300-3400 Hz). JSON and a PNG in
``bench/results/``. Usage: ``python -m bench.caller_gate_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import soxr

from agent.bargein.gate import CallerGate, GateParams, Verdict
from processors.speaker import SpeakerEncoder
from transports.rig.audio import synth_speech

RESULTS = Path(__file__).resolve().parent / "results"
RATE = 16000
CALLERS = ["en-us+f3", "en-us+m3", "en-gb+f2", "en-us+f5"]
OTHERS = ["en-us+m1", "en-gb+m1", "de+m2", "en-us+klatt", "fr+m4", "en-us+croak"]
ENROL = ["Hello, is that you? I wanted to ask about dinner tonight.",
         "Could you tell me what time the doctor comes tomorrow?",
         "I think I left my glasses in the kitchen again."]
TEST = ["Wait, stop please, I have a question for you.", "No, that is not what I asked you at all.",
        "Hold on, can you say that again more slowly?", "Sorry, I did not hear the last part."]
TV = ["Breaking news tonight: heavy rain is expected across the region.",
      "And the home team scores again in the final minute of the match."]


def band(pcm: np.ndarray, kind: str) -> np.ndarray:
    if kind == "wide":
        return pcm
    narrow = soxr.resample(pcm.astype(np.float32), RATE, 8000)
    spectrum = np.fft.rfft(narrow)
    freqs = np.fft.rfftfreq(len(narrow), 1 / 8000)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    return soxr.resample(np.fft.irfft(spectrum, len(narrow)), 8000, RATE).astype(np.float32)


def at_db(pcm: np.ndarray, db: float) -> np.ndarray:
    rms = np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) or 1.0
    return pcm * (32768 * 10 ** (db / 20) / rms)


def stretch(pcm: np.ndarray, seconds: float, offset: float = 0.1) -> np.ndarray:
    start = int(offset * RATE)
    return pcm[start : start + int(seconds * RATE)]


def eer(caller: list[float], other: list[float]) -> float:
    best = 1.0
    for threshold in np.linspace(0, 1, 201):
        miss = np.mean(np.array(caller) < threshold)
        false = np.mean(np.array(other) >= threshold)
        best = min(best, max(miss, false))
    return float(best)


def annie_voice() -> callable | None:
    try:
        from agent.demo.standins.piper_server import PiperSynthesizer, joe_voice_path, piper_available
    except ImportError:
        return None
    if not piper_available():
        return None
    piper = PiperSynthesizer(joe_voice_path())
    return lambda text: soxr.resample(np.frombuffer(piper.speak(text), dtype=np.int16), 24000, RATE)


class SynthVoices:
    """Callers, the TV and other voices as espeak-ng variants speaking the sentences above."""

    def __init__(self, band_kind: str, callers: list[str]):
        self.band_kind, self.callers, self.others, self.tests = band_kind, callers, OTHERS, len(TEST)
        self._said: dict[tuple[str, str], np.ndarray] = {}

    def _say(self, text: str, v: str) -> np.ndarray:
        if (text, v) not in self._said:
            self._said[(text, v)] = band(at_db(synth_speech(text, RATE, voice=v).astype(np.float32), -24), self.band_kind)
        return self._said[(text, v)]

    def enrol(self, caller: str) -> list[np.ndarray]:
        return [self._say(text, caller) for text in ENROL]

    def test(self, caller: str, i: int) -> np.ndarray:
        return self._say(TEST[i], caller)

    def tv(self, caller: str, i: int) -> np.ndarray:
        others = [v for v in self.others if v != caller]
        return self._say(TV[i % len(TV)], others[i % len(others)])

    def other(self, caller: str, i: int) -> np.ndarray:
        others = [v for v in self.others if v != caller]
        return self._say(TEST[i], others[(i + 1) % len(others)])


class CorpusVoices:
    """Real recordings: ``DIR/<speaker>/*.flac|wav`` (LibriSpeech's layout), one speaker a folder.

    Each speaker is a caller in turn, enrolled from her first three recordings; her other
    recordings are her test stretches, and the TV and the second voice are the other speakers'
    recordings, same sex first where ``DIR/SPEAKERS.TXT`` (LibriSpeech's) says who is who, so
    the hard case is measured. Levels as above (-24 dBFS), through the same band."""

    def __init__(self, root: Path, band_kind: str, tests: int = 4):
        import soundfile

        self.band_kind, self.tests = band_kind, tests
        self.files: dict[str, list[Path]] = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in (".flac", ".wav"))
            if len(files) >= 3 + tests:
                self.files[folder.name] = files
        if len(self.files) < 3:
            raise SystemExit(f"--voices {root}: need at least 3 speaker folders with {3 + tests} recordings each")
        self.sex = _librispeech_sexes(root / "SPEAKERS.TXT")
        self.callers = self.others = list(self.files)
        self._read = soundfile.read
        self._cache: dict[Path, np.ndarray] = {}

    def _load(self, path: Path) -> np.ndarray:
        if path not in self._cache:
            pcm, rate = self._read(path, dtype="float32", always_2d=True)
            pcm = pcm[:, 0] if rate == RATE else soxr.resample(pcm[:, 0], rate, RATE)
            self._cache[path] = band(at_db(pcm, -24), self.band_kind)
        return self._cache[path]

    def _others(self, caller: str) -> list[str]:
        same = [s for s in self.files if s != caller and self.sex.get(s) == self.sex.get(caller)]
        return same + [s for s in self.files if s != caller and s not in same]

    def enrol(self, caller: str) -> list[np.ndarray]:
        return [self._load(f) for f in self.files[caller][:3]]

    def test(self, caller: str, i: int) -> np.ndarray:
        return self._load(self.files[caller][3 + i])

    def tv(self, caller: str, i: int) -> np.ndarray:
        others = self._others(caller)
        return self._load(self.files[others[i % len(others)]][-1 - i % 2])

    def other(self, caller: str, i: int) -> np.ndarray:
        others = self._others(caller)
        return self._load(self.files[others[(i + 1) % len(others)]][3 + i])


def _librispeech_sexes(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    sexes = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 2 and not line.startswith(";"):
            sexes[parts[0]] = parts[1]
    return sexes


def run(seconds_list: list[float], voices, offset: float = 0.1, log=print) -> dict:
    encoder = SpeakerEncoder()
    params = GateParams()
    annie = annie_voice()
    band_kind = voices.band_kind
    annie_enrol = [band(at_db(annie(t).astype(np.float32), -24), band_kind) for t in ENROL[:2]] if annie else []
    scores: dict[str, dict[str, list[float]]] = {}
    verdicts: dict[str, dict[str, dict[str, int]]] = {}
    for seconds in seconds_list:
        s_key = f"{seconds:g}s"
        scores[s_key] = {k: [] for k in ("caller", "caller+tv", "tv", "other voice", "annie echo")}
        verdicts[s_key] = {k: {v.value: 0 for v in Verdict} for k in scores[s_key]}
        for caller in voices.callers:
            gate = CallerGate(params)
            for pcm in voices.enrol(caller):
                gate.enroll_caller(encoder.embed(pcm), len(pcm) / RATE)
            for pcm in annie_enrol:
                gate.enroll_annie(encoder.embed(pcm), len(pcm) / RATE)

            def score(kind: str, pcm: np.ndarray) -> None:
                scored = gate.verdict(encoder.embed(stretch(pcm, seconds, offset)))
                if scored.caller is not None:
                    scores[s_key][kind].append(scored.caller)
                verdicts[s_key][kind][scored.verdict.value] += 1

            for i in range(voices.tests):
                own = voices.test(caller, i)
                score("caller", own)
                tv = voices.tv(caller, i)
                for snr in (20, 10, 5, 0):
                    n = min(len(own), len(tv))
                    score("caller+tv", own[:n] + tv[:n] * 10 ** (-snr / 20))
                score("tv", tv)
                score("other voice", voices.other(caller, i))
                if annie:
                    score("annie echo", band(at_db(annie(TEST[i % len(TEST)]).astype(np.float32), -40), band_kind))
        log(f"{s_key}: " + ", ".join(f"{k} {np.median(v):.2f}" for k, v in scores[s_key].items() if v))
    summary = {}
    for s_key, by_kind in scores.items():
        caller = by_kind["caller"] + by_kind["caller+tv"]
        other = by_kind["tv"] + by_kind["other voice"] + by_kind["annie echo"]
        summary[s_key] = {
            "eer": round(eer(caller, other), 3) if caller and other else None,
            "scores": {k: {"n": len(v), "median": round(float(np.median(v)), 3), "p5": round(float(np.percentile(v, 5)), 3),
                           "p95": round(float(np.percentile(v, 95)), 3)} for k, v in by_kind.items() if v},
            "verdicts": verdicts[s_key],
        }
    return {"band": band_kind, "callers": voices.callers, "others": voices.others,
            "annie": "Piper en_US-joe-medium" if annie else None, "offset_s": offset,
            "params": params.__dict__, "summary": summary, "raw": scores}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["raw"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), sharey=True)
    for ax, key in zip(np.atleast_1d(axes), keys):
        data = {k: v for k, v in result["raw"][key].items() if v}
        ax.boxplot(list(data.values()), tick_labels=list(data))
        ax.axhline(result["params"]["caller_min"], color="tab:green", ls="--", lw=1)
        ax.axhline(result["params"]["not_caller_max"], color="tab:red", ls="--", lw=1)
        ax.set_title(f"{key} stretches, EER {result['summary'][key]['eer']}")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel("cosine to the caller's enrolment")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", default="0.6,1.0,1.5", help="stretch lengths to score (comma-separated)")
    parser.add_argument("--band", choices=("wide", "narrow"), default="wide")
    parser.add_argument("--quick", action="store_true", help="one caller, one length")
    parser.add_argument("--voices", type=Path, help="real recordings instead of espeak-ng: DIR/<speaker>/*.flac|wav"
                        " (LibriSpeech's layout; DIR/SPEAKERS.TXT, if there, pairs each caller with same-sex others)")
    parser.add_argument("--offset", type=float, default=0.1, help="where in each test recording the stretch starts (s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    seconds = [0.6] if args.quick else [float(s) for s in args.seconds.split(",")]
    callers = CALLERS[:1] if args.quick else CALLERS
    started = time.monotonic()
    voices = CorpusVoices(args.voices, args.band) if args.voices else SynthVoices(args.band, callers)
    if args.voices and args.quick:
        voices.callers = voices.callers[:1]
    result = run(seconds, voices, args.offset)
    result.update(machine={"python": sys.version.split()[0], "platform": platform.platform()},
                  wall_s=round(time.monotonic() - started, 1),
                  command="python -m bench.caller_gate_bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"caller_gate_{args.band}" + ("_" + args.voices.name if args.voices else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    try:
        plot(result, args.out / f"{stem}.png")
    except ImportError:
        print("no plot: matplotlib is not installed (the bench extra)")
    for key, s in result["summary"].items():
        print(f"{key}: EER {s['eer']}; verdicts " + "; ".join(
            f"{kind} " + "/".join(f"{v}" for v in counts.values()) for kind, counts in s["verdicts"].items()))
    print("(verdict counts are caller/not_caller/unsure) wrote " + str(args.out / f"{stem}.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

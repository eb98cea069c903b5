"""Why the rig detects a barge-in late: the caller at the echo-cancelled source, with and without Annie.

For each trial the rig plays one of Annie's sentences (Piper, as in the barge-in benchmark, else
espeak-ng) into the canceller's sink and, 1.2 s later, a caller's interruption or backchannel into
the microphone; the same caller clip is also played alone. The raw mic and the cancelled source are
recorded; the caller's onset in each recording is found by cross-correlation with the clip (exact
to a sample, whatever the sound server's latency). Then, offline:

- **suppression**: the caller's level at the source in its first 300 ms during double talk, against
  the same clip alone (dB lost to the canceller's suppressor);
- **VAD delay**: pipecat's Silero VAD (the agent's analyzer, fed 20 ms blocks like the PulseAudio
  transport) run on the source, for several parameter sets: time from the caller's onset to the
  VAD's "speaking" state, and which gate held it back (confidence or pipecat's ``min_volume``);
- **echo-only starts**: the same analyzers on Annie's echo alone (each start is a false pause).

Usage: ``python -m bench.bargein_aec_probe [--aec-args "..."] [--trials 6] [--echo-gain-db 0]``;
prints a table per AEC setting and writes ``bench/results/bargein_aec_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger

from bench import bargein_audio as audio
from transports.rig.pulse import DEFAULT_AEC_ARGS, PulseRig
from transports.rig.audio import synth_speech

RATE = 16000
RESULTS = Path(__file__).resolve().parent / "results"
ANNIE_LINES = (
    "Once upon a time there was a little lighthouse keeper who lived by the sea with her old grey cat.",
    "Every morning she climbed the winding stairs to polish the great lamp until it shone like the sun.",
    "The village baker sent up warm bread in a basket on a long rope, and the cat always tried to steal it.",
    "One stormy night a small fishing boat lost its way, and the keeper lit every lantern she had.",
)
CALLER_CLIPS = (*audio.INTERRUPTIONS[:4], "mm-hm", "okay", "yeah", "uh-huh")
CALLER_DELAY_S = 1.2


@dataclass(frozen=True)
class VadSetting:
    confidence: float
    start_ms: int
    min_volume: float

    @property
    def label(self) -> str:
        return f"conf {self.confidence} start {self.start_ms} ms minvol {self.min_volume}"


VAD_SETTINGS = (
    VadSetting(0.7, 200, 0.6),
    VadSetting(0.7, 64, 0.6),
    VadSetting(0.7, 200, 0.0),
    VadSetting(0.7, 100, 0.0),
    VadSetting(0.7, 64, 0.0),
    VadSetting(0.7, 64, 0.3),
    VadSetting(0.7, 96, 0.45),
    VadSetting(0.5, 64, 0.0),
)


def annie_voice():
    """Annie's sentences as the benchmark's TTS makes them (Piper joe-medium), 24 kHz int16."""
    try:
        from agent.demo.standins.piper_server import PiperSynthesizer, joe_voice_path

        voice = PiperSynthesizer(joe_voice_path())
        return "Piper en_US-joe-medium", lambda text: (np.frombuffer(voice.speak(text), dtype=np.int16), 24000)
    except Exception:  # noqa: BLE001 - espeak when Piper is not installed
        return "espeak-ng", lambda text: (synth_speech(text, 24000), 24000)


def run_vad(samples: np.ndarray, setting: VadSetting) -> dict:
    """Feed 20 ms blocks to a fresh Silero analyzer; per 32 ms window: (end sample, confidence, volume, state)."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams, VADState

    vad = SileroVADAnalyzer(sample_rate=RATE, params=VADParams(confidence=setting.confidence,
                            start_secs=setting.start_ms / 1000, stop_secs=0.2, min_volume=setting.min_volume))
    vad.set_sample_rate(RATE)
    conf: list[float] = []
    vol: list[float] = []
    inner_conf, inner_vol = vad.voice_confidence, vad._get_smoothed_volume
    vad.voice_confidence = lambda b: conf.append(inner_conf(b)) or conf[-1]  # type: ignore[method-assign]
    vad._get_smoothed_volume = lambda b: vol.append(inner_vol(b)) or vol[-1]  # type: ignore[method-assign]
    states = []
    block = RATE // 50
    for i in range(0, len(samples) - block + 1, block):
        state = vad._run_analyzer(samples[i : i + block].tobytes())
        states.append((i + block, state == VADState.SPEAKING))
    return {"conf": np.array(conf), "vol": np.array(vol), "speaking": states}


def vad_onsets(states: list[tuple[int, bool]]) -> list[int]:
    """Sample index (block end) of each quiet -> speaking transition."""
    out, prev = [], False
    for end, speaking in states:
        if speaking and not prev:
            out.append(end)
        prev = speaking
    return out


def onset_in(recording: np.ndarray, clip: np.ndarray) -> int:
    """Where ``clip`` starts in ``recording`` (cross-correlation), plus its own first loud sample."""
    rec = recording.astype(np.float32)
    ref = clip.astype(np.float32)
    n = 1 << int(np.ceil(np.log2(len(rec) + len(ref))))
    xc = np.fft.irfft(np.fft.rfft(rec, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(rec)]
    lag = int(np.argmax(xc))
    blocks = len(clip) // 160
    levels = np.sqrt((clip[: blocks * 160].astype(np.float64).reshape(blocks, 160) ** 2).mean(axis=1))
    first = int(np.argmax(levels > levels.max() * 10 ** (-30 / 20))) * 160
    return lag + first


def dbfs(x: np.ndarray) -> float:
    return float(20 * np.log10(max(np.sqrt(np.mean(x.astype(np.float64) ** 2)), 1e-3) / 32768))


def record(rig: PulseRig, annie: tuple[np.ndarray, int] | None, caller: np.ndarray | None) -> dict[str, np.ndarray]:
    recs = {"raw": rig.record(rig.RAW_MIC), "source": rig.record(rig.SOURCE)}
    time.sleep(0.3)
    plays = []
    if annie is not None:
        plays.append(rig.play(annie[0], annie[1], device=rig.SINK))
    if caller is not None:
        if annie is not None:
            time.sleep(CALLER_DELAY_S)
        plays.append(rig.play(caller, RATE))
    for p in plays:
        p.wait(30)
    time.sleep(0.5)
    return {k: r.stop().samples for k, r in recs.items()}


def analyze_detection(source: np.ndarray, onset: int) -> dict:
    out = {}
    for s in VAD_SETTINGS:
        v = run_vad(source, s)
        starts = [t for t in vad_onsets(v["speaking"]) if t >= onset - RATE // 20]
        already = any(sp for end, sp in v["speaking"] if onset - 160 <= end <= onset + 320)
        delay = (starts[0] - onset) / RATE * 1000 if starts and not already else None
        win = 512
        first_conf = next((i * win - onset for i, c in enumerate(v["conf"]) if i * win >= onset and c >= s.confidence), None)
        first_vol = next((i * win - onset for i, x in enumerate(v["vol"]) if i * win >= onset and x >= s.min_volume), None)
        out[s.label] = {"delay_ms": delay, "already_speaking": already,
                        "first_conf_ms": None if first_conf is None else first_conf / RATE * 1000,
                        "first_vol_ms": None if first_vol is None else first_vol / RATE * 1000}
    return out


def trial(rig: PulseRig, speak, i: int, rng: np.random.Generator) -> dict:
    text = CALLER_CLIPS[i % len(CALLER_CLIPS)]
    level = audio.CALLER_LEVEL_DBFS + float(rng.choice([-6.0, -3.0, 0.0, 3.0]))
    caller = audio.speech(text, i, level)
    annie = speak(ANNIE_LINES[i % len(ANNIE_LINES)])
    alone = record(rig, None, caller)
    both = record(rig, annie, caller)
    res: dict = {"caller": text, "caller_dbfs": level, "annie_dbfs": audio.active_rms(annie[0] / 32768.0),
                 "_audio": {}}
    res["annie_dbfs"] = 20 * np.log10(max(res["annie_dbfs"], 1e-6))
    first = int(0.3 * RATE)
    for name, rec in (("alone", alone), ("double_talk", both)):
        on_raw = onset_in(rec["raw"], caller)
        on_src = onset_in(rec["source"], caller)
        src = rec["source"]
        res["_audio"][name] = (src, on_src)
        res[name] = {
            "caller_at_source_dbfs_first300": dbfs(src[on_src : on_src + first]),
            "raw_mic_dbfs_first300": dbfs(rec["raw"][on_raw : on_raw + first]),
            "source_before_caller_dbfs": dbfs(src[max(0, on_src - first) : on_src]),
            "vad": analyze_detection(src, on_src),
        }
    res["suppression_db"] = (res["alone"]["caller_at_source_dbfs_first300"]
                             - res["double_talk"]["caller_at_source_dbfs_first300"])
    # Echo only: Annie's whole sentence with no caller; every VAD start is a false pause.
    echo = record(rig, annie, None)
    res["_audio"]["echo"] = (echo["source"], -1)
    res["echo_only"] = {"raw_dbfs": dbfs(echo["raw"]), "source_dbfs": dbfs(echo["source"]),
                        "seconds": len(echo["source"]) / RATE,
                        "starts": {s.label: len(vad_onsets(run_vad(echo["source"], s)["speaking"])) for s in VAD_SETTINGS}}
    return res


def summarize(trials: list[dict]) -> dict:
    out: dict = {"suppression_db_median": float(np.median([t["suppression_db"] for t in trials])),
                 "annie_dbfs_median": float(np.median([t["annie_dbfs"] for t in trials])),
                 "echo_raw_dbfs_median": float(np.median([t["echo_only"]["raw_dbfs"] for t in trials])),
                 "echo_source_dbfs_median": float(np.median([t["echo_only"]["source_dbfs"] for t in trials])),
                 "echo_seconds": float(sum(t["echo_only"]["seconds"] for t in trials)), "vad": {}}
    for s in VAD_SETTINGS:
        row = {}
        for cond in ("alone", "double_talk"):
            d = [t[cond]["vad"][s.label]["delay_ms"] for t in trials]
            got = [x for x in d if x is not None]
            row[cond] = {"median_ms": float(np.median(got)) if got else None, "max_ms": float(max(got)) if got else None,
                         "missed": sum(1 for t in trials if t[cond]["vad"][s.label]["delay_ms"] is None
                                       and not t[cond]["vad"][s.label]["already_speaking"]),
                         "already": sum(1 for t in trials if t[cond]["vad"][s.label]["already_speaking"])}
        row["echo_only_starts"] = sum(t["echo_only"]["starts"][s.label] for t in trials)
        out["vad"][s.label] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aec-args", action="append", help=f"aec_args to compare (default: {DEFAULT_AEC_ARGS!r})")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--echo-gain-db", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "bargein_aec_probe.json")
    parser.add_argument("--dump", type=Path, help="also save the recorded sources here (.npz per setting)")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    label, speak = annie_voice()
    results = {"annie_voice": label, "echo_gain_db": args.echo_gain_db, "settings": {}}
    for aec_args in args.aec_args or [DEFAULT_AEC_ARGS]:
        rng = np.random.default_rng(3)
        with PulseRig(aec_args=aec_args) as rig:
            if args.echo_gain_db:
                rig.set_echo_gain_db(args.echo_gain_db)
            trials = [trial(rig, speak, i, rng) for i in range(args.trials)]
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            arrays = {f"{i}_{k}": a for i, t in enumerate(trials) for k, (a, _) in t["_audio"].items()}
            onsets = {f"{i}_{k}": o for i, t in enumerate(trials) for k, (_, o) in t["_audio"].items()}
            np.savez(args.dump / f"{aec_args.replace(' ', '_').replace('=', '') or 'webrtc_defaults'}.npz",
                     onsets=json.dumps(onsets), **arrays)
        for t in trials:
            t.pop("_audio")
        summary = summarize(trials)
        results["settings"][aec_args] = {"summary": summary, "trials": trials}
        print(f"\n== aec_args {aec_args!r} (echo gain {args.echo_gain_db} dB, Annie {label}) ==")
        print(f"Annie {summary['annie_dbfs_median']:.1f} dBFS; echo-only raw mic {summary['echo_raw_dbfs_median']:.1f}, "
              f"source {summary['echo_source_dbfs_median']:.1f} dBFS; caller lost to suppression in its first 300 ms "
              f"(median) {summary['suppression_db_median']:.1f} dB")
        for t in trials:
            print(f"  {t['caller'][:24]:24s} {t['caller_dbfs']:.0f} dBFS: alone {t['alone']['caller_at_source_dbfs_first300']:.1f}, "
                  f"double talk {t['double_talk']['caller_at_source_dbfs_first300']:.1f} dBFS at the source "
                  f"(raw {t['double_talk']['raw_mic_dbfs_first300']:.1f}); echo before it {t['double_talk']['source_before_caller_dbfs']:.1f}")
        print(f"  {'VAD':40s} {'alone med/max (miss)':24s} {'double talk med/max (miss, already)':36s} echo-only starts in {summary['echo_seconds']:.0f} s")
        for name, row in summary["vad"].items():
            a, d = row["alone"], row["double_talk"]
            fmt = lambda r: f"{r['median_ms'] if r['median_ms'] is not None else float('nan'):.0f}/{r['max_ms'] if r['max_ms'] is not None else float('nan'):.0f}"
            print(f"  {name:40s} {fmt(a) + ' (' + str(a['missed']) + ')':24s} "
                  f"{fmt(d) + ' (' + str(d['missed']) + ', ' + str(d['already']) + ')':36s} {row['echo_only_starts']}")
    args.out.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How soon the VAD hears a caller who talks over Annie: the phone presets and AEC3, offline, many trials.

The barge-in bench measures stop latency on the PulseAudio rig in real time, 4-8 interruptions a
preset a run. This script runs the same chain faster than real time so a setting can be judged on
hundreds of onsets: Annie's voice through a preset's echo path (:class:`transports.rig.linemodel.EchoPath`)
plus the caller's clip as the line delivers it, into the agent's own :class:`transports.aec.Aec3Canceller`
(fed with what Annie played, on a simulated clock: 20 ms capture blocks, the reference written as
it plays), then pipecat's Silero VAD analyzer with the pause-first settings, in 20 ms blocks like
the transport. For each preset and caller level it reports:

- **detect**: from the caller's first loud 10 ms to the VAD's "speaking" state (median, p95,
  misses within 2 s), per VAD confidence, with Annie talking (double talk) and without her
  (``alone``: Silero's own time on that voice and level);
- **echo starts**: the VAD's starts on Annie's echo alone, per minute (each one a false pause).

Without the rig's timing jitter the absolute figures are kinder than the rig's; compare settings
within one run. Usage: ``python -m bench.bargein_onset_offline [--presets ...] [--levels -30,-24]
[--confidences 0.7,0.5] [--gain off,on] [--events 24]``; writes ``bench/results/bargein_onset_offline.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import soxr

from bench import bargein_audio as audio
from bench.bargein_aec_probe import ANNIE_LINES, VadSetting, annie_voice, run_vad, vad_onsets
from transports.aec import Aec3Canceller
from transports.rig.linemodel import DEFAULT_PRESETS, EchoPath, preset, to_int16

RATE = 16000
BLOCK = RATE // 50  # 20 ms, as the transport reads
WARMUP_S = 8.0  # Annie talks this long before the first caller: AEC3 has converged, as mid-call
EVERY_S = 4.0  # one caller clip every this many seconds
WINDOW_S = 2.0  # a VAD start this long after the onset still counts; later is a miss
RESULTS = Path(__file__).resolve().parent / "results"


def annie_track(seconds: float) -> np.ndarray:
    """Annie talking for ``seconds`` (her sentences in a loop, 0.25 s apart), 16 kHz int16."""
    _, speak = annie_voice()
    parts = []
    for text in ANNIE_LINES:
        pcm, rate = speak(text)
        parts += [soxr.resample(pcm, rate, RATE), np.zeros(RATE // 4, np.int16)]
    one = np.concatenate(parts)
    return np.resize(one, int(seconds * RATE))


def caller_clips(events: int) -> list[tuple[str, np.ndarray]]:
    """Interruptions and backchannels in turn, the bench's voices, at the nominal level."""
    out = []
    for i in range(events):
        text = audio.INTERRUPTIONS[i // 2 % len(audio.INTERRUPTIONS)] if i % 2 == 0 else audio.BACKCHANNELS[i // 2 % len(audio.BACKCHANNELS)]
        out.append((text, audio.speech(text, i)))
    return out


def first_loud(x: np.ndarray) -> int:
    blocks = len(x) // 160
    levels = np.sqrt((x[: blocks * 160].astype(np.float64).reshape(blocks, 160) ** 2).mean(axis=1))
    return int(np.argmax(levels > levels.max() * 10 ** (-30 / 20))) * 160


def cancelled(line, annie: np.ndarray | None, caller: np.ndarray, gain: bool) -> np.ndarray:
    """The mic (echo + caller) through AEC3 fed with what Annie played, block by block on a simulated clock."""
    now = [0.0]
    aec = Aec3Canceller(RATE, clock=lambda: now[0], auto_gain=gain)
    echo = EchoPath(line) if annie is not None and line.has_echo else None
    out = np.empty_like(caller)
    for i in range(0, len(caller) - BLOCK + 1, BLOCK):
        mic = caller[i : i + BLOCK].astype(np.float64) / 32768.0
        if annie is not None:
            played = annie[i : i + BLOCK]
            aec.reference.written(played.tobytes(), RATE, write_started=i / RATE)
            if echo is not None:
                mic = mic + echo.process(played.astype(np.float64) / 32768.0)
        now[0] = (i + BLOCK) / RATE
        out[i : i + BLOCK] = np.frombuffer(aec.process(to_int16(mic).tobytes()), np.int16)
    return out


def detections(track: np.ndarray, onsets: list[int], setting: VadSetting) -> tuple[list[float | None], int]:
    """Per onset: ms from it to the VAD's start (None: missed, or already speaking); and the already count."""
    states = run_vad(track, setting)["speaking"]
    starts = vad_onsets(states)
    speaking = dict(states)
    out, already = [], 0
    for on in onsets:
        block_end = (on // BLOCK + 1) * BLOCK
        if speaking.get(block_end):
            already += 1
            out.append(None)
            continue
        hits = [s for s in starts if on - BLOCK <= s <= on + WINDOW_S * RATE]
        out.append((hits[0] - on) * 1000 / RATE if hits else None)
    return out, already


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 0) if values else None


def run(args) -> dict:
    clips = caller_clips(args.events)
    seconds = WARMUP_S + EVERY_S * args.events + 1.0
    annie = annie_track(seconds)
    settings = [VadSetting(float(c), args.start_ms, 0.0) for c in args.confidences.split(",")]
    rows = []
    for name in args.presets.split(","):
        for level in [float(v) for v in args.levels.split(",")]:
            line = preset(name).with_(caller_dbfs=level)
            caller = np.zeros(len(annie), np.int16)
            onsets = []
            for k, (_, clip) in enumerate(clips):
                heard = line.caller_audio(clip)
                at = int((WARMUP_S + EVERY_S * k) * RATE)
                caller[at : at + len(heard)] = heard[: len(caller) - at]
                onsets.append(at + first_loud(heard))
            for gain in [g == "on" for g in args.gain.split(",")]:
                t0 = time.perf_counter()
                both = cancelled(line, annie, caller, gain)
                alone = cancelled(line, None, caller, gain)
                echo = cancelled(line, annie, np.zeros_like(caller), gain)
                for s in settings:
                    row = {"preset": name, "caller_dbfs": level, "gain": gain, "confidence": s.confidence, "start_ms": s.start_ms}
                    for label, track in (("double_talk", both), ("alone", alone)):
                        found, already = detections(track, onsets, s)
                        hit = [d for d in found if d is not None]
                        row[label] = {"n": len(found), "median_ms": pct(hit, 50), "p95_ms": pct(hit, 95),
                                      "missed": sum(d is None for d in found) - already, "already_speaking": already,
                                      "over_300ms": sum(d > 300 for d in hit)}
                    echo_min = (len(echo) / RATE - WARMUP_S) / 60
                    starts = [x for x in vad_onsets(run_vad(echo, s)["speaking"]) if x > WARMUP_S * RATE]
                    row["echo"] = {"minutes": round(echo_min, 2), "starts": len(starts), "per_min": round(len(starts) / echo_min, 1)}
                    rows.append(row)
                    dt, al = row["double_talk"], row["alone"]
                    print(f"{name:14s} {level:6.1f} dBFS gain {'on ' if gain else 'off'} conf {s.confidence:.2f}: "
                          f"double talk {dt['median_ms']} / {dt['p95_ms']} ms (>300 {dt['over_300ms']}, missed {dt['missed']}, "
                          f"already {dt['already_speaking']}, n {dt['n']}); alone {al['median_ms']} / {al['p95_ms']} "
                          f"(missed {al['missed']}); echo starts {row['echo']['per_min']} a min ({row['echo']['starts']} in "
                          f"{row['echo']['minutes']} min)", flush=True)
                print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return {"args": vars(args) | {"out": str(args.out)}, "annie_voice": annie_voice()[0], "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    p.add_argument("--levels", default="-30,-27,-24,-21", help="caller levels at the mic, dBFS")
    p.add_argument("--confidences", default="0.7,0.6,0.5,0.4")
    p.add_argument("--start-ms", type=int, default=64, help="the VAD's start time (BARGE_IN_VAD_START_MS)")
    p.add_argument("--gain", default="off", help="AEC3 with WebRTC's gain control after it: off, on or off,on")
    p.add_argument("--events", type=int, default=24, help="caller clips per preset and level")
    p.add_argument("--out", type=Path, default=RESULTS / "bargein_onset_offline.json")
    args = p.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

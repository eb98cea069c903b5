"""Can a level gate tell Annie's echo residue from the caller when the VAD starts?

Reads the pickle a rig pass dumps (``BARGEIN_DUMP=PREFIX python -m bench.bargein_bench --passes
rig-pause ...`` writes ``PREFIX-rig-pause.pkl``) and, for every VAD start while Annie was audible,
compares the echo-cancelled mic (the agent's input) with Annie's voice at the caller's ear:

* ``in_max``: the loudest 20 ms frame of the agent's input in the 200 ms before the VAD start;
* ``out_max``: the loudest frame of Annie's played voice in the 400 ms before it;
* ``in_minus_out``: their difference, what a far-end level (Geigel-style) double-talk gate compares;
* ``envelope_corr``: the best correlation, over echo delays 0-250 ms, of the 10 ms log-energy
  envelopes of the agent's input and Annie's voice in the 400 ms before the start (a crude
  stand-in for a coherence-based double-talk detector: echo should follow Annie's envelope).

Starts within a caller event (onset - 0.3 s to end + 1 s) are the caller's; all others are echo.
Prints p5 / median / p95 of each per class, and how many of each a gate at a few margins would let
through; writes ``bench/results/echo_levels.json``.

Usage: ``python -m bench.echo_levels PREFIX-rig-pause.pkl``.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from bench.bargein_metrics import in_caller_window

RESULTS = Path(__file__).resolve().parent / "results"
RATE, FRAME = 16000, 320
ANNIE_AUDIBLE_DBFS = -45.0


def frame_levels(pcm: np.ndarray) -> np.ndarray:
    """dBFS of each 20 ms frame."""
    x = pcm.astype(np.float64)
    n = len(x) // FRAME
    rms = np.sqrt((x[: n * FRAME].reshape(n, FRAME) ** 2).mean(axis=1)) + 1e-9
    return 20 * np.log10(rms / 32768)


def envelope_corr(heard: np.ndarray, played: np.ndarray, end: int, win: int = 6400, max_lag: int = 4000) -> float:
    """Best Pearson correlation of 10 ms log-energy envelopes, ``heard[end - win:end]`` against
    ``played`` delayed by 0..``max_lag`` samples."""

    def env(x: np.ndarray) -> np.ndarray:
        e = np.log((x.astype(np.float64).reshape(-1, 160) ** 2).mean(axis=1) + 1.0)
        return e - e.mean()

    a, best = env(heard[end - win : end]), -1.0
    for lag in range(0, max_lag + 1, 160):
        if end - win - lag < 0:
            break
        b = env(played[end - win - lag : end - lag])
        best = max(best, float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-9)))
    return best


def vad_start_levels(dump: dict) -> list[dict]:
    t0, utterances = dump["t0"], dump["utterances"]
    heard, played = frame_levels(dump["agent_input"]), frame_levels(dump["output"])
    rows = []
    for t in dump["times"].get("vad_start", []):
        k = int((t - t0) * RATE / FRAME)
        if k < 20 or k > len(heard):
            continue
        in_max, out_max = float(heard[k - 10 : k].max()), float(played[k - 20 : k].max())
        if out_max < ANNIE_AUDIBLE_DBFS:
            continue  # Annie silent: no echo to tell apart
        caller = in_caller_window(utterances, t)
        corr = envelope_corr(dump["agent_input"], dump["output"], k * FRAME)
        rows.append({"t": round(t - t0, 2), "who": "caller" if caller else "echo", "in_max": round(in_max, 1),
                     "out_max": round(out_max, 1), "in_minus_out": round(in_max - out_max, 1),
                     "envelope_corr": round(corr, 2)})
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for who in ("caller", "echo"):
        mine = [r for r in rows if r["who"] == who]
        if not mine:
            continue
        out[who] = {"n": len(mine)}
        for key in ("in_max", "out_max", "in_minus_out", "envelope_corr"):
            out[who][key] = [round(float(v), 1) for v in np.percentile([r[key] for r in mine], [5, 50, 95])]
        out[who]["passing_gate_at_margin_db"] = {
            str(m): sum(r["in_minus_out"] > m for r in mine) for m in (-25, -20, -15, -10)
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS / "echo_levels.json")
    args = parser.parse_args(argv)
    with args.dump.open("rb") as f:
        dump = pickle.load(f)
    if dump.get("agent_input") is None:
        parser.error("this dump has no agent input (a simulated-line pass, or an older dump)")
    rows = vad_start_levels(dump)
    summary = summarize(rows)
    for who, s in summary.items():
        print(f"{who}: {s['n']} VAD starts while Annie was audible; p5/median/p95 in_max {s['in_max']} dBFS, "
              f"out_max {s['out_max']} dBFS, in - out {s['in_minus_out']} dB, envelope correlation {s['envelope_corr']}; "
              f"let through by a gate 'in - out > margin': {s['passing_gate_at_margin_db']}")
    args.out.write_text(json.dumps({"dump": str(args.dump), "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

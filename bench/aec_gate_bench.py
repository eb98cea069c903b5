"""Benchmark: how repeatable is the preflight's echo-cancellation gate?

Runs the ``aec`` gate's measurement (espeak-ng speech played into the canceller's sink, levels
recorded at its source and at its raw mic) many times on a private PulseAudio rig with webrtc
AEC, and once per run on the raw mic as the "no echo cancellation" baseline. Prints the median,
p5 and p95 of the attenuation (played level minus level at the source, what the gate compares
with 20 dB) and of the ERLE (raw mic minus source), and writes
``bench/results/aec_gate_bench.json`` (and a PNG when matplotlib is installed).

Usage: ``python -m bench.aec_gate_bench [--runs 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from agent.preflight import MIN_AEC_ATTENUATION_DB
from agent.preflight_audio import measure_echo

RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "p5": round(pct(values, 5), 1),
        "p95": round(pct(values, 95), 1),
        "min": round(min(values), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    from transports.rig.pulse import PulseRig

    with PulseRig() as rig:
        for key in ("PULSE_SERVER", "XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH", "PULSE_STATE_PATH", "HOME"):
            os.environ[key] = rig.env[key]
        cancelled, baseline = [], []
        started = time.monotonic()
        for i in range(args.runs):
            cancelled.append(measure_echo(rig.SINK, rig.SOURCE))
            baseline.append(measure_echo(rig.SPEAKER, rig.RAW_MIC))
            print(f"run {i + 1}/{args.runs}: AEC {cancelled[-1].attenuation_db:.1f} dB "
                  f"(ERLE {cancelled[-1].erle_db:.1f} dB), raw mic {baseline[-1].attenuation_db:.1f} dB")
    attenuation = [m.attenuation_db for m in cancelled]
    erle = [m.erle_db for m in cancelled if m.erle_db is not None]
    raw = [m.attenuation_db for m in baseline]
    result = {
        "runs": args.runs,
        "seconds": round(time.monotonic() - started, 1),
        "threshold_db": MIN_AEC_ATTENUATION_DB,
        "attenuation_db": summary(attenuation),
        "erle_db": summary(erle),
        "no_aec_attenuation_db": summary(raw),
        "gate_passes": sum(a >= MIN_AEC_ATTENUATION_DB for a in attenuation),
        "gate_passes_without_aec": sum(a >= MIN_AEC_ATTENUATION_DB for a in raw),
        "machine": platform.platform(),
        "samples": {"attenuation_db": attenuation, "erle_db": erle, "no_aec_attenuation_db": raw},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "aec_gate_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.boxplot([attenuation, erle, raw])
    ax.set_xticks([1, 2, 3], ["AEC attenuation", "AEC ERLE", "raw mic (no AEC)"])
    ax.axhline(MIN_AEC_ATTENUATION_DB, color="red", linestyle="--", label="gate threshold")
    ax.set_ylabel("dB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "aec_gate_bench.png", dpi=100)


if __name__ == "__main__":
    main()

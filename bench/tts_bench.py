"""Benchmark: what ChatterboxTTSService adds to first audio, and how fast a cancel goes silent.

Runs the service in a pipeline against the Chatterbox stand-in server in a child process (so the
server's work does not share our event loop) and measures, with ``time.monotonic()`` on both
sides (one system clock):

* first-audio overhead: the server's first byte on the wire -> the first audio frame at the end
  of the pipeline (where the output transport sits); also request queued -> request at server.
  Warm (keep-alive connection, 24 kHz and resampled to 16 kHz) and after a cancel (a new
  connection, since a cancelled request's connection is closed).
* cancel-to-silence at the transport boundary: ``InterruptionFrame`` queued -> the last thing
  the transport would see of the cancelled utterance (its last audio frame or the interruption
  itself, whichever is later); and cancel -> the server sees the disconnect.

Usage: ``python -m bench.tts_bench [--runs 100]``; prints medians and p95, writes
``bench/results/tts_bench.json`` and ``bench/results/tts_bench.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from loguru import logger
from pipecat.frames.frames import InterruptionFrame, TTSSpeakFrame, TTSStoppedFrame

from agent.demo.standins.tts_server import TTSStandInProcess
from processors.chatterbox.smoke import LONG_TEXT, TTSProbe
from processors.chatterbox.tts import ChatterboxTTSService

SHORT_TEXT = "Of course, I can help with that."
RESULTS = Path(__file__).resolve().parent / "results"


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(values), "median_ms": 1000 * statistics.median(values), "p95_ms": 1000 * p95,
            "min_ms": 1000 * ordered[0], "max_ms": 1000 * ordered[-1]}


async def warm_first_audio(url: str, runs: int, out_rate: int) -> list[dict]:
    """Utterances that play to the end, so each next one reuses the keep-alive connection."""
    samples = []
    async with TTSProbe(ChatterboxTTSService(base_url=url, voice="default"),
                        audio_out_sample_rate=out_rate) as probe:
        for _ in range(runs + 1):  # the first one opens the connection: not counted
            stops = len(probe.sink.frames(TTSStoppedFrame))
            sent = await probe.send(TTSSpeakFrame(SHORT_TEXT))
            await probe.sink.wait_for(lambda: len(probe.sink.frames(TTSStoppedFrame)) > stops, 20)
            samples.append({"sent": sent, "first_audio": probe.audio()[0].at})
            probe.sink.arrivals.clear()
    return samples[1:]


async def cancels(url: str, runs: int, cancel_after_s: float) -> list[dict]:
    """Long utterances cancelled ``cancel_after_s`` after their first audio."""
    samples = []
    async with TTSProbe(ChatterboxTTSService(base_url=url, voice="default")) as probe:
        for _ in range(runs):
            sent = await probe.send(TTSSpeakFrame(LONG_TEXT))
            await probe.sink.wait_for(lambda: bool(probe.audio()), 20)
            first = probe.audio()[0]
            await asyncio.sleep(cancel_after_s)
            cancel = await probe.send(InterruptionFrame())
            await probe.sink.wait_for(lambda: bool(probe.sink.frames(InterruptionFrame)), 5)
            await asyncio.sleep(0.05)  # anything stale would arrive in this window
            silent = max([probe.sink.frames(InterruptionFrame)[0].at]
                         + [a.at for a in probe.audio(first.frame.context_id)])
            samples.append({"sent": sent, "first_audio": first.at, "cancel": cancel, "silent": silent})
            probe.sink.arrivals.clear()
    return samples


def join(samples: list[dict], records: list[dict]) -> list[dict]:
    assert len(records) >= len(samples), "the server saw fewer requests than utterances"
    return [s | {"server": r} for s, r in zip(samples, records[-len(samples):])]


def measure(runs: int, cancel_after_s: float) -> dict:
    results: dict = {}
    with TTSStandInProcess(first_byte_delay_s=0.05, realtime_factor=50.0) as fast:
        for rate in (24000, 16000):
            done = join(asyncio.run(warm_first_audio(fast.url, runs, rate)), fast.records())
            results[f"warm_{rate}"] = done
    with TTSStandInProcess(first_byte_delay_s=0.05, realtime_factor=1.0) as live:
        results["after_cancel"] = join(asyncio.run(cancels(live.url, runs, cancel_after_s)), live.records())
    return results


def report(results: dict) -> dict:
    out: dict = {"first_audio_overhead": {}, "request_dispatch": {}}
    for name, samples in results.items():
        out["first_audio_overhead"][name] = summary(
            [s["first_audio"] - s["server"]["first_byte_at"] for s in samples])
        out["request_dispatch"][name] = summary([s["server"]["started_at"] - s["sent"] for s in samples])
    cancelled = results["after_cancel"]
    out["cancel_to_silence"] = summary([s["silent"] - s["cancel"] for s in cancelled])
    out["cancel_to_server_disconnect"] = summary(
        [s["server"]["disconnected_at"] - s["cancel"] for s in cancelled if s["server"]["disconnected_at"]])
    out["cancelled_requests_completed"] = sum(s["server"]["finished_at"] is not None for s in cancelled)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, samples in results.items():
        values = sorted(1000 * (s["first_audio"] - s["server"]["first_byte_at"]) for s in samples)
        left.plot(values, [i / len(values) for i in range(len(values))], label=name)
    left.set(title="server first byte -> first audio at the transport", xlabel="ms", ylabel="CDF")
    left.legend()
    cancelled = results["after_cancel"]
    for label, key in (("cancel -> silence at transport", "silent"),):
        values = sorted(1000 * (s[key] - s["cancel"]) for s in cancelled)
        right.plot(values, [i / len(values) for i in range(len(values))], label=label)
    values = sorted(1000 * (s["server"]["disconnected_at"] - s["cancel"])
                    for s in cancelled if s["server"]["disconnected_at"])
    right.plot(values, [i / len(values) for i in range(len(values))], label="cancel -> server sees disconnect")
    right.set(title="after an InterruptionFrame", xlabel="ms", ylabel="CDF")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--cancel-after", type=float, default=0.3, help="seconds after first audio")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    started = time.monotonic()
    results = measure(args.runs, args.cancel_after)
    summary_ = report(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"runs": args.runs, "cancel_after_s": args.cancel_after, "python": platform.python_version(),
            "machine": platform.machine(), "wall_s": round(time.monotonic() - started, 1)}
    (RESULTS / "tts_bench.json").write_text(json.dumps({"meta": meta, "summary": summary_}, indent=2))
    try:
        plot(results, RESULTS / "tts_bench.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install '.[bench]')")
    for section in ("first_audio_overhead", "request_dispatch"):
        for name, s in summary_[section].items():
            print(f"{section:22s} {name:13s} median {s['median_ms']:6.2f} ms  p95 {s['p95_ms']:6.2f} ms  (n={s['n']})")
    for key in ("cancel_to_silence", "cancel_to_server_disconnect"):
        s = summary_[key]
        print(f"{key:36s} median {s['median_ms']:6.2f} ms  p95 {s['p95_ms']:6.2f} ms  (n={s['n']})")
    print(f"cancelled requests that completed anyway: {summary_['cancelled_requests_completed']}")


if __name__ == "__main__":
    main()

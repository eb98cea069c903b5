"""Benchmark: interruption to silence at the sink, through PulseAudioTransport on the rig.

For each trial, Annie's output (a 440 Hz tone, as TTS frames at 24 kHz) streams through a
``PulseAudioTransport`` into ``echo_cancel_sink`` of a private PulseAudio rig (the same path as
on the box: echo canceller, then the ``speaker`` null sink). At a random moment 0.5-1.0 s in, an
``InterruptionFrame`` is queued; the ``speaker.monitor`` recording (10 ms blocks, timestamped
with ``time.monotonic()`` like the interruption) says when the last audible block arrived.

The figure is an upper bound on the true gap: it includes the recorder's own capture delay (one
10 ms block plus the monitor's latency). Configurations: flushing on/off, and 60 ms (default) or
200 ms of PulseAudio playback buffer (``audio_out_buffer_ms``).

Usage: ``python -m bench.flush_bench [--trials 30]``; prints median/p95 per configuration and
writes ``bench/results/flush_bench.json`` and ``bench/results/flush_bench.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from loguru import logger
from pipecat.frames.frames import InterruptionFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

from transports.pulse import PulseAudioParams, PulseAudioTransport
from transports.rig.pulse import PulseRig
from transports.rig.audio import tone

RESULTS = Path(__file__).resolve().parent / "results"
OUT_RATE = 24000
LOUD_DBFS = -50.0
CONFIGS = [
    {"label": "flush, 60 ms buffer", "flush_on_interruption": True, "audio_out_buffer_ms": 60},
    {"label": "no flush, 60 ms buffer", "flush_on_interruption": False, "audio_out_buffer_ms": 60},
    {"label": "flush, 200 ms buffer", "flush_on_interruption": True, "audio_out_buffer_ms": 200},
    {"label": "no flush, 200 ms buffer", "flush_on_interruption": False, "audio_out_buffer_ms": 200},
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "p95": round(pct(values, 95), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


async def run_config(rig: PulseRig, config: dict, trials: int, rng: random.Random) -> dict:
    params = PulseAudioParams(
        server=rig.server, source=rig.SOURCE, sink=rig.SINK,
        audio_in_enabled=False, audio_out_enabled=True, audio_out_sample_rate=OUT_RATE,
        flush_on_interruption=config["flush_on_interruption"],
        audio_out_buffer_ms=config["audio_out_buffer_ms"],
    )
    transport = PulseAudioTransport(params)
    worker = PipelineWorker(
        Pipeline([transport.output()]),
        params=PipelineParams(audio_out_sample_rate=OUT_RATE),
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    audio = tone(440, 3.0, OUT_RATE, -12)
    step = OUT_RATE // 10  # 100 ms TTS chunks
    gaps, onsets = [], []
    try:
        await asyncio.sleep(0.5)
        for _ in range(trials):
            frames = [
                TTSAudioRawFrame(audio[i : i + step].tobytes(), OUT_RATE, 1, context_id="bench")
                for i in range(0, len(audio), step)
            ]
            with rig.record(rig.SPEAKER_MONITOR) as speaker:
                queued = time.monotonic()
                await worker.queue_frames(frames)
                await asyncio.sleep(rng.uniform(0.5, 1.0))
                interrupted = time.monotonic()
                await worker.queue_frames([InterruptionFrame()])
                await asyncio.sleep(0.6)
            rec = speaker.recording
            first, last = rec.first_loud_time(LOUD_DBFS, queued), rec.last_loud_time(LOUD_DBFS)
            if first is None or last is None:
                raise RuntimeError("nothing reached the speaker")
            onsets.append(1000 * (first - queued))
            gaps.append(1000 * (last - interrupted))
            await asyncio.sleep(0.2)
    finally:
        await worker.cancel(reason="bench over")
        await asyncio.wait_for(task, 10)
    return {**config, "interrupt_to_silence_ms": gaps, "queue_to_first_audio_ms": onsets}


async def main_async(trials: int, seed: int) -> dict:
    rng = random.Random(seed)
    started = time.monotonic()
    with PulseRig() as rig:
        runs = [await run_config(rig, config, trials, rng) for config in CONFIGS]
    results = {
        "trials": trials,
        "seconds": round(time.monotonic() - started, 1),
        "sink": "echo_cancel_sink -> webrtc AEC -> speaker (null sink), measured at speaker.monitor",
        "machine": platform.platform(),
        "configs": [
            {
                "label": run["label"],
                "flush_on_interruption": run["flush_on_interruption"],
                "audio_out_buffer_ms": run["audio_out_buffer_ms"],
                "interrupt_to_silence_ms": summary(run["interrupt_to_silence_ms"]),
                "queue_to_first_audio_ms": summary(run["queue_to_first_audio_ms"]),
                "samples_ms": [round(g, 1) for g in run["interrupt_to_silence_ms"]],
            }
            for run in runs
        ],
    }
    return results


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    configs = results["configs"]
    ax.boxplot([c["samples_ms"] for c in configs], showfliers=True)
    ax.set_xticks(range(1, len(configs) + 1), [c["label"].replace(", ", "\n") for c in configs])
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="50 ms target")
    ax.set_ylabel("interruption -> last audible block (ms)")
    ax.set_title(f"PulseAudio flush on interruption ({results['trials']} trials each)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    results = asyncio.run(main_async(args.trials, args.seed))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flush_bench.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "flush_bench.png")
    for c in results["configs"]:
        gap, onset = c["interrupt_to_silence_ms"], c["queue_to_first_audio_ms"]
        print(f"{c['label']:>24}: interruption -> silence median {gap['median']} ms, p95 {gap['p95']} ms"
              f" (max {gap['max']}); queue -> first audio median {onset['median']} ms")


if __name__ == "__main__":
    main()

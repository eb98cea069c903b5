"""Whisper's CPU threads: transcriptions per second, and what they do to a 20 ms audio thread.

For each thread count, tiny.en (the revert path's model) transcribes 3 s of audio over and over
for ``--seconds`` while another thread runs pipecat's Silero VAD on a 20 ms tick, as the
transport's audio path does; prints how many transcriptions finished and how late the ticks ran
(p50, p95, p99, max). CTranslate2's own default (``cpu_threads=0``) is 4 OpenMP threads.

Usage: ``python bench/whisper_threads.py [--threads 1,0,2] [--seconds 20]``; writes
``bench/results/whisper_threads.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def ticks(stop: threading.Event, late: list[float], vad) -> None:
    block = (np.random.default_rng(0).standard_normal(320) * 1000).astype(np.int16).tobytes()
    due = time.perf_counter()
    while not stop.is_set():
        due += 0.02
        vad._run_analyzer(block)
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        late.append(max(0.0, time.perf_counter() - due) * 1000)


def measure(threads: int, seconds: float) -> dict:
    from faster_whisper import WhisperModel
    from pipecat.audio.vad.silero import SileroVADAnalyzer

    from processors.whisper_stt import default_whisper_model_path

    model = WhisperModel(str(default_whisper_model_path()), device="cpu", compute_type="default", cpu_threads=threads)
    vad = SileroVADAnalyzer(sample_rate=16000)
    vad.set_sample_rate(16000)
    audio = (np.random.default_rng(1).standard_normal(16000 * 3) * 0.05).astype(np.float32)
    stop, late = threading.Event(), []
    tick = threading.Thread(target=ticks, args=(stop, late, vad))
    tick.start()
    t0, runs = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        list(model.transcribe(audio, language="en", beam_size=1, without_timestamps=True)[0])
        runs += 1
    elapsed = time.perf_counter() - t0
    stop.set()
    tick.join()
    a = np.array(late)
    row = {"cpu_threads": threads, "transcriptions": runs, "seconds": round(elapsed, 1),
           "s_per_transcription": round(elapsed / runs, 2), "ticks": len(a),
           **{f"tick_late_{k}_ms": round(float(np.percentile(a, q)), 1) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))},
           "tick_late_max_ms": round(float(a.max()), 1)}
    print(f"cpu_threads {threads}: {runs} transcriptions of 3 s in {elapsed:.0f} s ({row['s_per_transcription']} s each); "
          f"20 ms tick late p50 {row['tick_late_p50_ms']} / p95 {row['tick_late_p95_ms']} / p99 {row['tick_late_p99_ms']} / "
          f"max {row['tick_late_max_ms']} ms (n {len(a)})", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,0,2", help="CTranslate2 cpu_threads values, in the order run")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=RESULTS / "whisper_threads.json")
    args = p.parse_args()
    rows = [measure(int(t), args.seconds) for t in args.threads.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "load_before": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Eager NeMo steps vs the engine's fast path (slots, static shapes, CUDA graphs), side by side.

    python bench/asr_graph_bench.py                 # full-size architecture, random weights, GPU
    python bench/asr_graph_bench.py --tiny          # tiny model on CPU (checks the script runs)

One run, one model, 160 ms chunks (``--chunk``): the same streams are driven through an eager
engine (``fast=False``: ``conformer_stream_step`` per step, the issue-3 engine) and a fast one
(``fast=True``; CUDA graphs on a GPU), interleaved in blocks so machine drift hits both alike.
Printed as ratios (eager / fast):

* mismatches: every test turn's final text, eager single stream vs fast (alone, and batched
  with the others), in bf16 and in fp32. The model is the nemotron-0.6b architecture with
  RANDOM weights, its joint calibrated on audio so tokens depend on the input and a moderate
  blank bias, so tokens are actually emitted (the output says how many);
* time to final (``finalize`` of one stream, the turn's tail plus one chunk of silence) p50/p95;
* step latency p50/p95 for B streams in lockstep (one chunk each per step), B = 1 .. 2500 (the
  eager engine up to ``--eager-max-batch``; the fast one steps batches over ``--max-batch`` in
  pipelined parts);
* memory per stream (the fast path's slot; CUDA memory growth per stream) and the GPU time of
  one graph replay (so host time = step time - GPU time);
* the largest batch once more with the fast engine alone (no eager blocks in between), and
  again after ``gc.freeze()`` (garbage collector pauses are counted per step);
* a profile of one steady step at ``--profile-batch`` streams and at one (GPU): host vs GPU,
  GPU time per phase, the top aten ops by CUDA time and the kernel count, the top host functions
  (cProfile), garbage collector pauses;
* the arithmetic floor of a step at the profiled and the largest batch (``bench/asr_profile.py``): FLOPs and
  minimum bytes against the H100's bf16 rate and bandwidth, and the measured GPU time's distance.

Writes JSON (and a PNG) to bench/results/asr_graph_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.asr_bench import EngineLoad, percentile, sync  # noqa: E402
from bench.asr_profile import floor, graph_gpu_ms, print_profile, profile_fast_step  # noqa: E402
from processors.nemotron.engine import NemotronStreamingEngine  # noqa: E402
from bench.nemo_models import build_model, speechlike  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def pcm_of(seconds: float, seed: int) -> np.ndarray:
    return (speechlike(int(16000 * seconds), seed=seed) * 32767).astype(np.int16)


def turn_eager(engine, pcm) -> str:
    state = engine.new_stream()
    for i in range(0, len(pcm), 320):
        engine.accept(state, pcm[i : i + 320])
    return engine.finalize(state)


def turns_batched(engine, pcms) -> list[str]:
    """All turns at once: one batched step per 20 ms tick, batched finals."""
    states = [engine.new_stream() for _ in pcms]
    for offset in range(0, max(len(p) for p in pcms), 320):
        for state, pcm in zip(states, pcms):
            if offset < len(pcm):
                engine.feed(state, pcm[offset : offset + 320])
        while any(engine.ready(s) for s in states):
            engine.step(states)
    return engine.finalize_many(states)


def mismatches(eager, fast, pcms) -> dict:
    reference = [turn_eager(eager, p) for p in pcms]
    alone = [turn_eager(fast, p) for p in pcms]
    batched = turns_batched(fast, pcms)
    eager_batched = turns_batched(eager, pcms)  # how much batching alone moves eager NeMo

    def count(texts):
        diff_turns = sum(a != b for a, b in zip(reference, texts))
        diff_tokens = sum(_edit_distance(a, b) for a, b in zip(reference, texts))
        return diff_turns, diff_tokens

    return {
        "turns": len(pcms),
        "tokens": sum(len(t) for t in reference),
        "alone_turns_differing": count(alone)[0],
        "alone_token_edits": count(alone)[1],
        "batched_turns_differing": count(batched)[0],
        "batched_token_edits": count(batched)[1],
        "eager_batched_turns_differing": count(eager_batched)[0],
        "eager_batched_token_edits": count(eager_batched)[1],
    }


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in characters (= tokens: the model has character labels)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def time_finals(engines: dict, turns: int) -> dict:
    out = {name: [] for name in engines}
    for turn in range(turns):
        pcm = pcm_of(1.0 + 0.37 * (turn % 7), seed=turn)
        for name, engine in engines.items():
            state = engine.new_stream()
            for i in range(0, len(pcm), 320):
                engine.accept(state, pcm[i : i + 320])
            sync(engine)
            t0 = time.perf_counter()
            engine.finalize(state)
            sync(engine)
            out[name].append(1e3 * (time.perf_counter() - t0))
    return {name: {"p50_ms": round(percentile(v, 50), 2), "p95_ms": round(percentile(v, 95), 2)} for name, v in out.items()}


def time_steps(engines: dict, batch: int, steps: int, warmup: int) -> dict:
    loads = {name: EngineLoad(engine, batch) for name, engine in engines.items()}
    for load in loads.values():
        load.run(warmup, record=False)
    for _ in range(max(1, steps // 5)):
        for load in loads.values():
            load.run(5)
    out = {}
    for name, load in loads.items():
        out[name] = {
            "p50_ms": round(percentile(load.step_ms, 50), 2),
            "p95_ms": round(percentile(load.step_ms, 95), 2),
            "feed_p50_ms": round(percentile(load.feed_ms, 50), 2),
            "tokens_per_stream": round(sum(s.num_tokens for s in load.states) / batch, 1),
            **host_split(load),
            "gc_ms_total": round(sum(load.gc_ms), 2),
            "gc_ms_max_step": round(max(load.gc_ms, default=0.0), 2),
            "step_ms": [round(v, 2) for v in load.step_ms],
            "gc_ms": [round(v, 2) for v in load.gc_ms],
            "gpu_wait_ms": [None if v is None else round(v, 2) for v in load.wait_ms],
        }
    for load in loads.values():
        for s in load.states:
            s.reset()
    return out


def host_split(load) -> dict:
    """Per step, time blocked on the GPU (reading the tokens back) vs the rest (host work), p50."""
    if not load.wait_ms or load.wait_ms[0] is None:
        return {}
    host = [step - wait for step, wait in zip(load.step_ms, load.wait_ms)]
    return {"gpu_wait_p50_ms": round(percentile(load.wait_ms, 50), 2), "host_p50_ms": round(percentile(host, 50), 2),
            "host_p95_ms": round(percentile(host, 95), 2)}


def memory_per_stream(engine, batch: int) -> float | None:
    """CUDA memory growth per stream when ``batch`` new streams take their first two steps."""
    if engine.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    load = EngineLoad(engine, batch)
    load.run(3, record=False)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    for s in load.states:
        s.reset()
    return round(grown / batch / 2**20, 2)


def plot(results: dict, path: Path) -> None:
    """Step latency against streams per step: eager and fast, p95 solid, p50 dashed."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series = {name: [(r["batch"], r[name]) for r in results["steps"] if name in r] for name in ("eager", "fast", "fused")}
    for name, rows in series.items():
        if not rows:
            continue
        (line,) = ax.plot([b for b, _ in rows], [r["p95_ms"] for _, r in rows], marker="o", label=f"{name} p95")
        ax.plot([b for b, _ in rows], [r["p50_ms"] for _, r in rows], ls="--", color=line.get_color(), alpha=0.6)
    ax.axhline(80, color="grey", ls=":", lw=0.8, label="target p95 80 ms")
    ax.axhline(results["chunk_ms"], color="black", ls=":", lw=0.8, label=f"real time ({results['chunk_ms']} ms chunk)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("streams per batched step")
    ax.set_ylabel("step latency (ms)")
    final = results.get("time_to_final_b1", {}).get("fast", {})
    ax.set_title(f"{results['model']}\n{results['device']}, {results['precision']}, {results['chunk_ms']} ms chunks; "
                 f"fast time to final p50 {final.get('p50_ms')} ms", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ablations(model, args, device, batch: int) -> list[dict]:
    """The largest batch alone on variants of the fast engine: what each part of the design gives."""
    out = []
    for name, options in (("attention core in PyTorch products", {"ring_kernel": False}),
                          (f"parts of {args.max_batch // 2}", {"max_batch": args.max_batch // 2})):
        engine = NemotronStreamingEngine.from_model(model, args.chunk, device, precision="auto", fast=True,
                                                    **{"max_batch": args.max_batch, **options})
        row = {"variant": name, "batch": batch, **time_steps({"v": engine}, batch, args.steps, args.warmup)["v"]}
        row["gpu_ms"] = graph_gpu_ms(engine, batch)
        out.append({k: v for k, v in row.items() if not isinstance(v, list)})
        print(f"ablation, {name}, {batch} streams alone: step p50 {row['p50_ms']} / p95 {row['p95_ms']} ms, graph GPU {row['gpu_ms']} ms,"
              f" host p50 {row.get('host_p50_ms')} ms", flush=True)
        engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--chunk", type=int, default=160)
    parser.add_argument("--batches", default="1,16,256,512,1024")
    parser.add_argument("--eager-max-batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--check-turns", type=int, default=12)
    parser.add_argument("--blank-bias", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile-batch", type=int, default=1024, help="profile one steady step at this batch and at 1 (GPU; 0: skip)")
    parser.add_argument("--max-batch", type=int, default=1024, help="the fast engine steps larger batches in parts of this many streams")
    parser.add_argument("--skip-fp32", action="store_true", help="skip the fp32 mismatch check")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the PNG of a results JSON")
    parser.add_argument("--ablations", action="store_true",
                        help="then the largest batch alone with the attention core in PyTorch products, and in parts of half the size")
    parser.add_argument("--fuse", choices=("off", "on", "both"), default="off",
                        help="the fast engine's elementwise work compiled (processors.nemotron.fused); both: a fused "
                             "engine on a model of its own (built again, same seed) joins the interleaved blocks")
    parser.add_argument("--no-gc-freeze-compare", dest="gc_freeze_compare", action="store_false",
                        help="skip the second run of the largest batch after gc.freeze()")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return

    size = "tiny" if args.tiny else "full"
    device = "cpu" if args.tiny else "auto"
    def build():
        built = build_model(size, input_sensitive=True, blank_bias=args.blank_bias)  # seeded: the same weights every time
        decoding = copy.deepcopy(built.cfg.decoding)
        decoding.greedy.max_symbols = 10  # the production setting (calibration set 3)
        built.change_decoding_strategy(decoding, verbose=False)
        return built

    t0 = time.perf_counter()
    model = build()
    build_s = time.perf_counter() - t0
    results: dict = {
        "model": f"{size} cache-aware FastConformer RNN-T, RANDOM weights, joint calibrated on audio, blank bias +{1 + args.blank_bias}, max_symbols 10",
        "chunk_ms": args.chunk,
        "torch": torch.__version__,
        "build_s": round(build_s, 1),
    }

    def make(precision, fast, fuse=False, on=None):
        return NemotronStreamingEngine.from_model(on or model, args.chunk, device, precision=precision, fast=fast,
                                                  max_batch=args.max_batch, fuse=fuse)

    eager, fast = make("auto", False), make("auto", True, fuse=args.fuse == "on")
    others = {}
    if args.fuse == "both":  # its own model, built again: one engine at a time may hold graphs on a model
        t1 = time.perf_counter()
        others["fused"] = make("auto", True, fuse=True, on=build())
        results["fused_build_s"] = round(time.perf_counter() - t1, 1)
        print(f"# fused engine on a model of its own: built, compiled and warmed up in {results['fused_build_s']} s", flush=True)
    results["fuse"] = args.fuse
    results["device"] = torch.cuda.get_device_name() if eager.device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    results["precision"] = eager.precision
    results["fast_mode"] = repr(fast)
    print(f"# {results['model']}\n# {results['device']}, {eager.precision}, {args.chunk} ms chunks; eager = {eager!r}; fast = {fast!r}", flush=True)
    name = "asr_graph_" + ("cpu_tiny" if args.tiny else results["device"].replace("NVIDIA", "").split()[0].lower())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"

    def save():
        path.write_text(json.dumps(results, indent=2))

    pcms = [pcm_of(0.6 + 0.45 * i, seed=100 + i) for i in range(args.check_turns)]
    results["mismatch_" + eager.precision] = m = mismatches(eager, fast, pcms)
    print(f"mismatches {eager.precision}: {m}", flush=True)
    for other, engine in others.items():
        results[f"mismatch_{eager.precision}_{other}"] = m = mismatches(eager, engine, pcms)
        print(f"mismatches {eager.precision}, {other}: {m}", flush=True)
    save()
    finals = time_finals({"eager": eager, "fast": fast, **others}, args.turns)
    results["time_to_final_b1"] = finals
    print(
        f"time to final, batch 1: eager p50 {finals['eager']['p50_ms']} / p95 {finals['eager']['p95_ms']} ms; "
        f"fast p50 {finals['fast']['p50_ms']} / p95 {finals['fast']['p95_ms']} ms; "
        f"ratio p50 {finals['eager']['p50_ms'] / finals['fast']['p50_ms']:.1f}x",
        flush=True,
    )
    for other in others:
        print(f"time to final, batch 1, {other}: p50 {finals[other]['p50_ms']} / p95 {finals[other]['p95_ms']} ms", flush=True)
    save()

    results["steps"] = []
    print(f"{'batch':>5} {'eager p50':>9} {'eager p95':>9} {'fast p50':>9} {'fast p95':>9} {'p95 ratio':>9} {'gpu ms':>7} {'feed p50':>8} {'tok/str':>7} {'RT':>3}")
    for batch in [int(b) for b in args.batches.split(",")]:
        engines = {"fast": fast, **others} if batch > args.eager_max_batch else {"eager": eager, "fast": fast, **others}
        row = {"batch": batch, **time_steps(engines, batch, args.steps, args.warmup)}
        row["fast_gpu_ms"] = graph_gpu_ms(fast, batch)
        for other, engine in others.items():
            row[f"{other}_gpu_ms"] = graph_gpu_ms(engine, batch)
        results["steps"].append(row)
        e = row.get("eager", {})
        ratio = e.get("p95_ms", float("nan")) / row["fast"]["p95_ms"]
        print(
            f"{batch:>5} {e.get('p50_ms', float('nan')):>9.2f} {e.get('p95_ms', float('nan')):>9.2f} {row['fast']['p50_ms']:>9.2f}"
            f" {row['fast']['p95_ms']:>9.2f} {ratio:>8.1f}x {row['fast_gpu_ms'] or float('nan'):>7.2f} {row['fast']['feed_p50_ms']:>8.2f}"
            f" {row['fast']['tokens_per_stream']:>7} {'yes' if row['fast']['p95_ms'] <= args.chunk else 'no':>3}",
            flush=True,
        )
        for other in others:
            print(f"{'':>5} {other}: p50 {row[other]['p50_ms']:.2f} / p95 {row[other]['p95_ms']:.2f} ms, gpu {row[other + '_gpu_ms']} ms,"
                  f" host p50 {row[other].get('host_p50_ms')} ms", flush=True)
        save()

    largest = max(int(b) for b in args.batches.split(","))
    alone = time_steps({"fast": fast}, largest, args.steps, args.warmup)["fast"]
    results["fast_alone_largest_batch"] = {"batch": largest, **alone}
    for other, engine in others.items():
        row = time_steps({other: engine}, largest, args.steps, args.warmup)[other]
        results[f"{other}_alone_largest_batch"] = {"batch": largest, **row}
        print(f"{largest} streams, {other} engine alone: step p50 {row['p50_ms']} / p95 {row['p95_ms']} ms;"
              f" host p50 {row.get('host_p50_ms')} / p95 {row.get('host_p95_ms')} ms", flush=True)
    interleaved = results["steps"][-1]["fast"]
    print(
        f"{largest} streams, fast engine alone (no eager blocks in between): step p50 {alone['p50_ms']} / p95 {alone['p95_ms']} ms"
        f" (interleaved with eager: p50 {interleaved['p50_ms']} / p95 {interleaved['p95_ms']} ms); target p95 <= 80 ms at >= 2,500 streams;"
        f" garbage collector {alone['gc_ms_total']} ms in {len(alone['step_ms'])} steps (interleaved {interleaved['gc_ms_total']} ms);"
        f" host p50 {alone.get('host_p50_ms')} / p95 {alone.get('host_p95_ms')} ms, blocked on the GPU p50 {alone.get('gpu_wait_p50_ms')} ms",
        flush=True,
    )
    save()
    if args.gc_freeze_compare:
        gc.collect()
        gc.freeze()  # the model's and the libraries' objects leave the collector's generations
        frozen = time_steps({"fast": fast}, largest, args.steps, args.warmup)["fast"]
        gc.unfreeze()
        results["fast_alone_largest_batch_gc_frozen"] = {"batch": largest, **frozen}
        print(
            f"{largest} streams, fast engine alone after gc.freeze(): step p50 {frozen['p50_ms']} / p95 {frozen['p95_ms']} ms;"
            f" garbage collector {frozen['gc_ms_total']} ms in {len(frozen['step_ms'])} steps",
            flush=True,
        )
        save()
    if args.profile_batch and fast.device.type == "cuda":
        profiled = [("profile", fast, args.profile_batch), ("profile_b1", fast, 1)]
        profiled += [(f"profile_{other}", engine, args.profile_batch) for other, engine in others.items()]
        for key, engine, batch in profiled:
            try:
                results[key] = profile_fast_step(engine, batch)
                print_profile(results[key])
            except Exception as e:  # the profile is an extra: keep the rest of the run
                print(f"profile failed: {type(e).__name__}: {e}", flush=True)
            save()
        try:
            for batch in sorted({args.profile_batch, largest}):
                gpu = next((r["fast_gpu_ms"] for r in results["steps"] if r["batch"] == batch), None)
                results.setdefault("floor", {})[str(batch)] = row = floor(fast, batch, results["profile"]["gflop_per_stream_step"], gpu)
                print(f"arithmetic floor at {batch} streams: {row}", flush=True)
        except Exception as e:
            print(f"floor failed: {type(e).__name__}: {e}", flush=True)
        save()
    for engine in others.values():
        engine.close()
    if args.ablations and fast.device.type == "cuda":
        fast.close()  # one engine at a time may hold graphs on the shared model
        results["ablations"] = ablations(model, args, device, largest)
        save()
    results["fast_slot_bytes_per_stream"] = fast.bytes_per_stream
    results["memory_MiB_per_stream"] = {"eager": memory_per_stream(eager, 64), "fast": memory_per_stream(fast, 64)}
    if eager.device.type == "cuda":
        results["max_memory_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"memory per stream: fast slot {fast.bytes_per_stream / 2**20:.2f} MiB; growth per new stream (64 streams) {results['memory_MiB_per_stream']} MiB", flush=True)
    save()
    if eager.device.type == "cuda" and not args.skip_fp32:
        # Last: the bf16 engine's graphs point into the shared model; they go before new engines.
        fast.close()
        fresh = build()  # the bf16 engine stored the model's weights in bf16 (and its LSTM in fp16)
        e32, f32 = make("fp32", False, on=fresh), make("fp32", True, on=fresh)
        results["mismatch_fp32"] = m = mismatches(e32, f32, pcms[: max(4, args.check_turns // 2)])
        print(f"mismatches fp32: {m}", flush=True)
        save()
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

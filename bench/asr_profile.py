"""Where a fast-path ASR step's time goes (GPU), and how far it is from the arithmetic floor.

Used by ``bench/asr_graph_bench.py``: :func:`graph_gpu_ms` times the graph replays of one steady
step, :func:`profile_fast_step` splits a step into host and GPU, GPU phases, top aten ops and
host functions, and :func:`floor` counts a step's FLOPs and minimum bytes against the H100's bf16
rate and memory bandwidth.
"""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path

import torch

from bench.asr_bench import EngineLoad, gc_pauses, percentile

# H100 SXM, measured on this workplace's machines (research notes; KINDS.md): dense bf16 matrix
# products ~790 TFLOP/s, device memory ~3.0 TB/s (copy, bytes read plus written).
H100_BF16_FLOPS = 790e12
H100_BYTES_PER_S = 3.0e12


def steady_runners(engine, batch: int) -> list:
    """The steady-step runners one step of ``batch`` lockstep streams replays, one per part."""
    stepper = engine._stepper
    out, lo = [], 0
    while lo < batch:
        n = min(stepper.max_batch, batch - lo)
        bucket = 1 << max(0, (n - 1).bit_length())
        found = [
            r for (kind, b, _, start), r in stepper._runners.items()
            if b == bucket and not kind.first and not kind.keep_all and (start is None or start == lo + 1)
        ]
        found.sort(key=lambda r: r.start is None)  # in place first, as the step used it if it could
        if not found:
            return []
        out.append(found[0])
        lo += n
    return out


def graph_gpu_ms(engine, batch: int, repeats: int = 20) -> float | None:
    """GPU time of the graph replays of one steady step of ``batch`` streams (CUDA events).

    Gathered runners are pointed at the scratch slot; in-place ones step their rows' state for
    real (call between loads, whose streams are reset).
    """
    stepper = getattr(engine, "_stepper", None)
    if stepper is None or not stepper.graphs:
        return None
    runners = steady_runners(engine, batch)
    if not runners or any(r.graph is None for r in runners):
        return None
    with torch.inference_mode():
        for r in runners:
            if r.start is None:
                r.slots.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        for r in runners:
            r.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeats, 3)


def _timed(fn, repeats=3):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        result = fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeats, 2), result


def _phases(stepper, runner) -> dict:
    """GPU ms of the first part's encoder step and greedy search, run eagerly (launch gaps included)."""
    from processors.nemotron.encoder_step import StepCaches, encoder_step
    from processors.nemotron.slots import Rows

    pools, kind = stepper._pools.tensors, runner.kind
    rows = Rows(runner.slots, runner.start)
    caches = StepCaches(pools["channel"], pools["time"], rows, rows.read(pools["count"]), False, stepper.ring_kernel,
                        stepper.fuse and runner.bucket > 1)
    with stepper.autocast():
        encoder_ms, (encoded, encoded_len, _) = _timed(
            lambda: encoder_step(stepper.model.encoder, runner.mel, runner.mel_len, caches, kind.drop, kind.keep_all)
        )
        projected = stepper.model.joint.project_encoder(encoded.transpose(1, 2))
        state = (rows.read(pools["h"], 1).contiguous(), rows.read(pools["c"], 1).contiguous())
        decoder_ms, _ = _timed(lambda: stepper._greedy(projected, encoded_len, rows.read(pools["dec_out"]), state))
    return {"encoder": encoder_ms, "decoder": decoder_ms}


def profile_fast_step(engine, batch: int, top: int = 25) -> dict | None:
    """Where one steady ``batch``-stream step goes: host vs GPU, GPU time per phase, top ops.

    The phases run eagerly with CUDA events around them, so they include launch gaps the graph
    does not have; the ops table comes from torch.profiler on the first part's step, run eagerly
    (GPU time of each op's own kernels, by input shapes), with its count of kernels.
    """
    stepper = getattr(engine, "_stepper", None)
    if engine.device.type != "cuda" or stepper is None:
        return None
    load = EngineLoad(engine, batch)
    with gc_pauses() as pauses:
        load.run(10)
    step_p50 = percentile(load.step_ms[2:], 50)
    out_gc = {"gc_pauses": len(pauses), "gc_ms_total": round(sum(pauses), 2), "gc_max_ms": round(max(pauses, default=0.0), 2),
              "steps": len(load.step_ms), "step_p95_ms": round(percentile(load.step_ms[2:], 95), 2)}
    host = cProfile.Profile()
    host.enable()
    load.run(3, record=False)
    host.disable()
    gpu = graph_gpu_ms(engine, batch)
    runners = steady_runners(engine, batch)
    out = {"batch": batch, "step_p50_ms": round(step_p50, 2), "graph_gpu_ms": gpu, "host_ms": round(step_p50 - gpu, 2) if gpu else None,
           "gc": out_gc, "parts": [{"bucket": r.bucket, "rows_from": r.start or "gathered"} for r in runners]}
    runner = runners[0]
    with torch.inference_mode():
        out["phases_gpu_ms_eager_first_part"] = _phases(stepper, runner)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_flops=True) as prof:
            runner.body(runner.start)
            torch.cuda.synchronize()
    # FLOPs of the matrix products and convolutions (the profiler's count), per stream of the part
    out["gflop_per_stream_step"] = round(sum(e.flops for e in prof.key_averages() if e.flops) / runner.bucket / 1e9, 3)
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.self_device_time_total > 0 and "CompiledFxGraph" not in e.key]  # compiled pieces: their kernels are listed
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    out["top_ops_first_part"] = [  # by the GPU time of the op's own kernels (children not counted)
        {"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count, "cuda_ms": round(e.self_device_time_total / 1e3, 2)}
        for e in rows[:top]
    ]
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    out["kernels_first_part"] = len(kernels)
    out["kernel_gpu_ms_first_part"] = round(sum(e.device_time for e in kernels) / 1e3, 2)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:100], []).append(e.device_time)
    out["top_kernels_first_part"] = [  # every kernel, by name: where the GPU time goes, and how many launches
        {"kernel": name, "calls": len(times), "cuda_ms": round(sum(times) / 1e3, 3)}
        for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:40]
    ]
    stats = pstats.Stats(host).sort_stats("tottime")
    out["host_top_per_step"] = [
        {"function": f"{Path(file).name}:{line}({name})", "ms": round(1e3 * tt / 3, 2), "calls": nc // 3}
        for (file, line, name), (_, nc, tt, _, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]
    ]
    for s in load.states:
        s.reset()
    return out


def print_profile(p: dict) -> None:
    print(
        f"profile, batch {p['batch']} (parts {p['parts']}): step p50 {p['step_p50_ms']} ms = graph GPU {p['graph_gpu_ms']} ms"
        f" + host {p['host_ms']} ms; {p.get('gflop_per_stream_step')} GFLOP per stream; first part eagerly: phases (GPU ms) {p['phases_gpu_ms_eager_first_part']},"
        f" {p['kernels_first_part']} kernels, {p['kernel_gpu_ms_first_part']} ms; garbage collector {p['gc']}",
        flush=True,
    )
    for row in p["top_ops_first_part"]:
        print(f"  {row['cuda_ms']:>8.2f} ms {row['calls']:>4}x {row['op']:<32} {row['shapes']}")
    print("host (cProfile, per step incl. feeding, by own time):")
    for row in p["host_top_per_step"]:
        print(f"  {row['ms']:>8.2f} ms {row['calls']:>6}x {row['function']}")


def floor(engine, batch: int, gflop_per_stream: float, measured_gpu_ms: float | None) -> dict | None:
    """A steady step's arithmetic floor at ``batch`` streams: its FLOPs (``gflop_per_stream``, the
    profiler's count of one part) and the bytes it must move at least (weights once per part,
    each stream's caches and decoder state read once, its new frames written), against the
    H100's bf16 rate and bandwidth; and the measured GPU time's distance from it."""
    stepper = getattr(engine, "_stepper", None)
    if stepper is None or engine.device.type != "cuda":
        return None
    model = stepper.model
    weight_bytes = sum(p.numel() * p.element_size() for m in (model.encoder, model.decoder, model.joint) for p in m.parameters())
    ring = stepper._pools.tensors["channel"][:, 0]  # [L, W, D] of one slot
    frames = int(model.encoder.streaming_cfg.valid_out_len)
    new_bytes = ring.shape[0] * frames * ring.shape[-1] * ring.element_size()
    parts = -(-batch // stepper.max_batch)
    flops = gflop_per_stream * 1e9 * batch
    bytes_min = weight_bytes * parts + (stepper.bytes_per_stream + new_bytes) * batch
    compute_ms, memory_ms = 1e3 * flops / H100_BF16_FLOPS, 1e3 * bytes_min / H100_BYTES_PER_S
    out = {
        "batch": batch,
        "gflop_per_stream_step": gflop_per_stream,
        "tflop_per_step": round(flops / 1e12, 3),
        "min_gb_per_step": round(bytes_min / 1e9, 3),
        "compute_floor_ms": round(compute_ms, 2),
        "memory_floor_ms": round(memory_ms, 2),
        "floor_ms": round(max(compute_ms, memory_ms), 2),
        "assumes": "H100 bf16 dense 790 TFLOP/s, 3.0 TB/s; weights read once per part, each slot's state once",
    }
    if measured_gpu_ms:
        out["measured_gpu_ms"] = measured_gpu_ms
        out["times_floor"] = round(measured_gpu_ms / out["floor_ms"], 2)
    return out

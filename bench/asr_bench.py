"""Step latency and time to final of the streaming Nemotron engine, per chunk size and batch size.

    python bench/asr_bench.py --tiny              # tiny random model, CPU (what CI machines have)
    python bench/asr_bench.py --full              # full-size architecture, random weights, GPU
    python bench/asr_bench.py --host-only         # the fast path's host work alone (CPU, arithmetic stubbed)

``--full`` builds nvidia/nemotron-speech-streaming-en-0.6b's architecture (24 layers, d_model
1024, 8 heads, vocab 1024, 128 mel) with RANDOM weights and the joint biased toward blank so that
greedy decoding emits about as rarely as a trained model: the latencies are real, the text is
not. B streams advance in lockstep, each receiving one chunk of audio per step as it would in
real time; one batched ``engine.step`` serves them all. Batch B runs in real time when the step's
p95 is below the chunk duration. Time to final is ``engine.finalize`` on one stream (the rest of
the turn plus one chunk of silence as right context). Prints a table, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processors.nemotron.engine import CHUNK_MS_TO_RIGHT_CONTEXT, NemotronStreamingEngine  # noqa: E402
from bench.nemo_models import build_model, save_random_nemo, speechlike  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = {"source": "eager NeMo 3.0, H100, bf16, 160 ms (shared/DESIGN.md)", "b1_p50_ms": 38.4, "b1_p95_ms": 68.5, "b256_p95_ms": 81.2}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def gc_pauses():
    """Durations (ms) of the garbage collector's runs meanwhile."""
    pauses: list[float] = []
    started = [0.0]

    def callback(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(1e3 * (time.perf_counter() - started[0]))

    gc.callbacks.append(callback)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(callback)


@contextlib.contextmanager
def gpu_waits(engine):
    """Milliseconds the host spends blocked reading the fast path's tokens back (waiting for the
    GPU step, plus the read itself) meanwhile; None where the engine has no such split."""
    stepper = getattr(engine, "_stepper", None)
    if stepper is None or not hasattr(stepper, "launch"):
        yield None
        return
    waits: list[float] = []
    launch = stepper.launch

    def timed(read):
        def timed_read():
            t = time.perf_counter()
            try:
                return read()
            finally:
                waits.append(1e3 * (time.perf_counter() - t))

        return timed_read

    def timed_launch(*args, **kwargs):
        pending = launch(*args, **kwargs)
        for name in ("tokens", "emitted"):  # whichever the engine reads the part back with
            if hasattr(pending, name):
                setattr(pending, name, timed(getattr(pending, name)))
        return pending

    stepper.launch = timed_launch
    try:
        yield waits
    finally:
        del stepper.launch


class EngineLoad:
    """B engine streams in lockstep: each step feeds one chunk per stream, then steps them all."""

    def __init__(self, engine, batch: int):
        self.engine, self.batch = engine, batch
        self.chunk = 16 * engine.chunk_ms
        self.audio = (speechlike(16000 * 20, seed=1) * 32767).astype(np.int16)
        self.states = [engine.new_stream() for _ in range(batch)]
        self.offsets = [(i * 7919) % (len(self.audio) - self.chunk) for i in range(batch)]  # different audio
        self.n = 0
        self.step_ms: list[float] = []
        self.feed_ms: list[float] = []
        self.gc_ms: list[float] = []  # garbage collector pauses inside each recorded step
        self.wait_ms: list[float | None] = []  # blocked on the GPU inside each recorded step (fast path)
        self.cpu_ms: list[float] = []  # this process's CPU time inside each recorded step

    def run(self, steps: int, record: bool = True) -> None:
        engine, span = self.engine, len(self.audio) - self.chunk
        for _ in range(steps):
            t0 = time.perf_counter()
            for state, offset in zip(self.states, self.offsets):
                start = (offset + self.n * self.chunk) % span
                engine.feed(state, self.audio[start : start + self.chunk])
            t1, c1 = time.perf_counter(), time.process_time()
            with gc_pauses() as pauses, gpu_waits(engine) as waits:
                while any(engine.ready(s) for s in self.states):
                    engine.step(self.states)
                sync(engine)
            t2, c2 = time.perf_counter(), time.process_time()
            self.n += 1
            if record:
                self.feed_ms.append(1e3 * (t1 - t0))
                self.step_ms.append(1e3 * (t2 - t1))
                self.gc_ms.append(sum(pauses))
                self.wait_ms.append(None if waits is None else sum(waits))
                self.cpu_ms.append(1e3 * (c2 - c1))

    def row(self) -> dict:
        chunk_ms, p95, feed95 = self.engine.chunk_ms, percentile(self.step_ms, 95), percentile(self.feed_ms, 95)
        return {
            "chunk_ms": chunk_ms,
            "batch": self.batch,
            "steps": len(self.step_ms),
            "step_p50_ms": round(percentile(self.step_ms, 50), 2),
            "step_p95_ms": round(p95, 2),
            "feed_p50_ms": round(percentile(self.feed_ms, 50), 2),
            "real_time": bool(p95 + feed95 < chunk_ms),
            "streams_real_time_est": int(self.batch * chunk_ms / (p95 + feed95)),
            "tokens_per_stream": round(sum(s.num_tokens for s in self.states) / self.batch, 1),
        }


class StubDevice:
    """Stands in for the model's arithmetic on the fast path, so that a step times the engine's
    host work alone (audio, jobs, staging, bookkeeping, text): the preprocessor returns zero mel
    frames and each step's labels are random: a stream emits with probability ``p`` 1..``most``
    tokens (about what the random full-size model emits in ``asr_graph_bench.py``)."""

    def __init__(self, engine, p: float = 0.52, most: int = 15, seed: int = 0):
        self.blank, self.p, self.most = engine._stepper.blank, p, most
        self.hop, self.features = engine._hop, engine._features
        self.gen = torch.Generator().manual_seed(seed)
        engine._mel._preprocessor = self.mel
        engine._stepper.compute = self.labels

    def mel(self, input_signal, length):
        return torch.zeros(input_signal.shape[0], self.features, input_signal.shape[1] // self.hop + 1), length

    def labels(self, kind, mel, mel_len, slots, in_place=False):
        batch, width = mel.shape[0], 20
        counts = (torch.rand(batch, generator=self.gen) < self.p) * torch.randint(1, self.most + 1, (batch,), generator=self.gen)
        tokens = torch.randint(0, self.blank, (batch, width), generator=self.gen)
        return torch.where(torch.arange(width)[None, :] < counts[:, None], tokens, torch.full_like(tokens, self.blank))


def host_only(args) -> None:
    """The fast path's host work per step on the CPU, the model's arithmetic stubbed (StubDevice)."""
    torch.set_num_threads(1)  # the host's own work: one thread, as the engine's worker
    engine = NemotronStreamingEngine.from_model(build_model("tiny"), 160, "cpu", fast=True)
    StubDevice(engine)
    rows = []
    print(f"# fast path, host work only (model arithmetic stubbed), 160 ms chunks, {platform.machine()} CPU", flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        load = EngineLoad(engine, batch)
        load.run(args.warmup, record=False)
        load.run(args.steps)
        cpu = {"cpu_p50_ms": round(percentile(load.cpu_ms, 50), 2), "cpu_p95_ms": round(percentile(load.cpu_ms, 95), 2)}
        rows.append({**load.row(), **cpu, "gc_ms_total": round(sum(load.gc_ms), 2)})
        print(f"batch {batch}: step p50 {rows[-1]['step_p50_ms']} / p95 {rows[-1]['step_p95_ms']} ms (CPU time p50 {cpu['cpu_p50_ms']} /"
              f" p95 {cpu['cpu_p95_ms']} ms); feed p50 {rows[-1]['feed_p50_ms']} ms; {rows[-1]['tokens_per_stream']} tokens per stream,"
              f" garbage collector {rows[-1]['gc_ms_total']} ms in {args.steps} steps", flush=True)
        for s in load.states:
            s.reset()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "asr_host_only_cpu.json").write_text(json.dumps({"device": platform.machine(), "steps": rows}, indent=2))


class RawLoad:
    """NeMo's bare ``conformer_stream_step`` on fixed random mel, as the DESIGN.md baseline was
    measured (research/probes/asr_step_bench.py): no audio, no features, no per-stream state."""

    def __init__(self, engine, batch: int):
        self.engine, self.batch = engine, batch
        model, cfg = engine.model, engine.model.encoder.streaming_cfg
        frames = cfg.pre_encode_cache_size[1] + cfg.chunk_size[1]
        self.caches = model.encoder.get_initial_cache_state(batch_size=batch, device=engine.device)
        self.signal = torch.randn(batch, model.preprocessor.featurizer.nfilt, frames, device=engine.device)
        self.lengths = torch.full((batch,), frames, device=engine.device, dtype=torch.long)
        self.hyps = None
        self.step_ms: list[float] = []

    def run(self, steps: int, record: bool = True) -> None:
        engine, model = self.engine, self.engine.model
        for _ in range(steps):
            sync(engine)
            t0 = time.perf_counter()
            with torch.inference_mode(), engine._autocast():
                _, _, *self.caches, self.hyps = model.conformer_stream_step(
                    processed_signal=self.signal, processed_signal_length=self.lengths,
                    cache_last_channel=self.caches[0], cache_last_time=self.caches[1],
                    cache_last_channel_len=self.caches[2], keep_all_outputs=False, previous_hypotheses=self.hyps,
                    drop_extra_pre_encoded=model.encoder.streaming_cfg.drop_extra_pre_encoded, return_transcription=True,
                )
            sync(engine)
            if record:
                self.step_ms.append(1e3 * (time.perf_counter() - t0))

    def row(self) -> dict:
        return {
            "chunk_ms": self.engine.chunk_ms,
            "batch": self.batch,
            "steps": len(self.step_ms),
            "step_p50_ms": round(percentile(self.step_ms, 50), 2),
            "step_p95_ms": round(percentile(self.step_ms, 95), 2),
        }


def bench_batch(engine, batch: int, steps: int, warmup: int, raw: bool) -> tuple[dict, dict | None]:
    """Engine (and bare NeMo) steps, alternating blocks of 10 so machine drift hits both alike."""
    loads = [EngineLoad(engine, batch)] + ([RawLoad(engine, batch)] if raw else [])
    for load in loads:
        load.run(warmup, record=False)
    for _ in range(max(1, steps // 10)):
        for load in loads:
            load.run(10)
    return loads[0].row(), (loads[1].row() if raw else None)


def bench_final(engine, turns: int) -> dict:
    """Stream a turn on one stream, then time finalize (tail + one chunk of silence)."""
    final_ms = []
    for turn in range(turns):
        pcm = (speechlike(16000 + 16 * engine.chunk_ms * 2 + 160 * (turn * 3 % 17), seed=turn) * 32767).astype(np.int16)
        state = engine.new_stream()
        for i in range(0, len(pcm), 320):
            engine.accept(state, pcm[i : i + 320])
        sync(engine)
        t0 = time.perf_counter()
        engine.finalize(state)
        sync(engine)
        final_ms.append(1e3 * (time.perf_counter() - t0))
    return {"final_p50_ms": round(percentile(final_ms, 50), 2), "final_p95_ms": round(percentile(final_ms, 95), 2), "turns": turns}


def verify_streaming_equals_offline(model, device: str, label: str) -> list[dict]:
    """fp32: streamed text equals NeMo's whole-utterance text (same random model)."""
    from bench.nemo_models import offline_text

    out = []
    for chunk_ms in sorted(CHUNK_MS_TO_RIGHT_CONTEXT):
        engine = NemotronStreamingEngine.from_model(model, chunk_ms, device, precision="fp32")
        for seconds in (1.3, 3.7):
            pcm = (speechlike(int(16000 * seconds), seed=int(seconds)) * 32767).astype(np.int16)
            state = engine.new_stream()
            for i in range(0, len(pcm), 320):
                engine.accept(state, pcm[i : i + 320])
            streamed = engine.finalize(state, pad_ms=0)
            signal = pcm / 32768.0
            with torch.autocast(engine.device.type, enabled=False):
                reference, _ = offline_text(_OnDevice(engine.model, engine.device), signal)
            out.append({"model": label, "chunk_ms": chunk_ms, "seconds": seconds, "equal": streamed == reference, "chars": len(reference)})
    return out


class _OnDevice:
    """Lets ``offline_text`` (written for CPU tensors) run a model that lives on a GPU."""

    def __init__(self, model, device):
        self._model, self._device = model, device
        self.preprocessor = lambda input_signal, length: model.preprocessor(
            input_signal=input_signal.to(device), length=length.to(device)
        )
        self.encoder = model.encoder
        self.decoding = model.decoding


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for chunk_ms in sorted({r["chunk_ms"] for r in results["steps"]}):
        rows = [r for r in results["steps"] if r["chunk_ms"] == chunk_ms]
        (line,) = ax.plot([r["batch"] for r in rows], [r["step_p95_ms"] for r in rows], marker="o", label=f"{chunk_ms} ms: engine p95")
        ax.plot([r["batch"] for r in rows], [r["step_p50_ms"] for r in rows], ls="--", color=line.get_color(), alpha=0.6)
        raw = [r for r in results.get("raw_nemo", []) if r["chunk_ms"] == chunk_ms]
        if raw:
            ax.scatter([r["batch"] for r in raw], [r["step_p95_ms"] for r in raw], marker="x", color=line.get_color())
        ax.axhline(chunk_ms, color=line.get_color(), ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("streams per batched step")
    ax.set_ylabel("step latency (ms)")
    ax.set_title(
        f"{results['model']}\n{results['device']}, {results['precision']}: p95 solid, p50 dashed, "
        "bare NeMo p95 x, real-time limit dotted",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", action="store_true", help="tiny random model (2 layers, d_model 64) on CPU")
    size.add_argument("--full", action="store_true", help="full-size architecture, random weights, GPU if present")
    size.add_argument("--host-only", action="store_true", help="the fast path's host work alone (CPU, arithmetic stubbed)")
    parser.add_argument("--chunks", default="80,160,560,1120")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--turns", type=int, default=20, help="finalize timings per chunk size")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--cuda-graph-decoder", action="store_true")
    parser.add_argument("--verify", action="store_true", help="also check streaming == offline in fp32")
    parser.add_argument("--raw", action="store_true", help="also time bare NeMo steps (same chunks and batches)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.host_only:
        return host_only(args)

    device = "cpu" if args.tiny else "auto"
    if args.tiny:
        torch.manual_seed(0)
        nemo = save_random_nemo(Path(tempfile.mkdtemp()) / "tiny.nemo", blank_bias=0.0, input_sensitive=True)
        make = lambda ms: NemotronStreamingEngine.load(nemo, ms, device, precision=args.precision)  # noqa: E731
        label = "tiny random cache-aware FastConformer RNN-T (2 layers, d_model 64), loaded from .nemo"
    else:
        model = build_model("full", blank_bias=4.0)
        label = "nemotron-0.6b architecture, RANDOM weights, joint biased toward blank (+4)"
        make = lambda ms: NemotronStreamingEngine.from_model(  # noqa: E731
            model, ms, device, precision=args.precision, cuda_graph_decoder=args.cuda_graph_decoder
        )
    first = make(int(args.chunks.split(",")[0]))
    results = {
        "model": label,
        "params_M": round(sum(p.numel() for p in first.model.parameters()) / 1e6, 1),
        "device": torch.cuda.get_device_name() if first.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": first.precision,
        "cuda_graph_decoder": args.cuda_graph_decoder,
        "torch": torch.__version__,
        "baseline": BASELINE,
        "steps": [],
        "raw_nemo": [],
        "finals": [],
    }
    print(f"# {label}; {results['params_M']} M params; {results['device']}; {first.precision}", flush=True)
    print(f"{'chunk':>6} {'batch':>5} {'step p50':>9} {'step p95':>9} {'feed p50':>9} {'real time':>9} {'streams':>7} {'tok/str':>7}")
    for chunk_ms in [int(c) for c in args.chunks.split(",")]:
        engine = first if chunk_ms == first.chunk_ms else make(chunk_ms)
        for batch in [int(b) for b in args.batches.split(",")]:
            row, raw = bench_batch(engine, batch, args.steps, args.warmup, args.raw)
            results["steps"].append(row)
            print(
                f"{chunk_ms:>6} {batch:>5} {row['step_p50_ms']:>9.2f} {row['step_p95_ms']:>9.2f} {row['feed_p50_ms']:>9.2f}"
                f" {str(row['real_time']):>9} {row['streams_real_time_est']:>7} {row['tokens_per_stream']:>7}",
                flush=True,
            )
            if raw:
                results["raw_nemo"].append(raw)
                print(f"{'':>6} {'':>5} {raw['step_p50_ms']:>9.2f} {raw['step_p95_ms']:>9.2f}   <- bare NeMo step, same machine, interleaved", flush=True)
        final = {"chunk_ms": chunk_ms, **bench_final(engine, args.turns)}
        results["finals"].append(final)
        print(f"{chunk_ms:>6} time to final (1 stream, finalize incl. {chunk_ms} ms pad): p50 {final['final_p50_ms']} ms, p95 {final['final_p95_ms']} ms", flush=True)
        save(results, args, first)
    if args.verify:
        models = {"bench model": first.model, "tiny input-sensitive": build_model("tiny", input_sensitive=True)}
        results["verify_fp32"] = [v for label, m in models.items() for v in verify_streaming_equals_offline(m, device, label)]
        for v in results["verify_fp32"]:
            print(f"streaming == offline (fp32, {v['model']}, {v['chunk_ms']} ms, {v['seconds']} s): {v['equal']} ({v['chars']} chars)")
    path = save(results, args, first)
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")


def save(results: dict, args, engine) -> Path:
    """Write the JSON (after every chunk size, so a cut-off run still leaves its numbers)."""
    if args.tiny:
        name = "asr_tiny_cpu"
    else:
        gpu = results["device"].replace("NVIDIA", "").split()[0].lower() if engine.device.type == "cuda" else "cpu"
        name = f"asr_full_{gpu}" + ("_cgdec" if args.cuda_graph_decoder else "")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


if __name__ == "__main__":
    main()

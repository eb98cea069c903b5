"""CUDA-graph steps equal the eager NeMo path token for token (tiny random model, fp32, GPU).

CUDA graphs need a CUDA device: every test here is skipped on CPU-only machines (CI), where
tests/test_nemotron_scheduler.py checks the same static-shape steps run eagerly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from processors.nemotron.engine import NemotronStreamingEngine
from processors.nemotron.scheduler import StreamScheduler
from bench.nemo_models import speechlike, tiny_nemo_once

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; none is visible")


def int16(samples: np.ndarray) -> np.ndarray:
    return np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = tiny_nemo_once(tmp_path_factory.mktemp("nemo"))
    make = lambda ms, **kw: NemotronStreamingEngine.load(path, ms, "cuda", precision="fp32", **kw)  # noqa: E731
    return {ms: (make(ms, fast=False), make(ms, fast=True, cuda_graphs=True)) for ms in (80, 160, 1120)}


def transcribe(engine, pcm: np.ndarray) -> str:
    """One turn through ``engine`` in 20 ms frames, as the STT service feeds it."""
    state = engine.new_stream()
    for i in range(0, len(pcm), 320):
        engine.accept(state, pcm[i : i + 320])
    return engine.finalize(state)


@pytest.mark.parametrize("chunk_ms", [80, 160, 1120])
def test_graphed_single_stream_equals_eager(engines, chunk_ms):
    eager, graphed = engines[chunk_ms]
    assert "cuda graphs" in repr(graphed)
    for seconds in (0.3, 1.9, 4.1):
        pcm = int16(speechlike(int(seconds * 16000), seed=int(seconds * 10)))
        texts = [transcribe(engine, pcm) for engine in (eager, graphed)]
        assert texts[0] and texts[0] == texts[1], seconds


def test_graphed_scheduler_equals_eager_alone(engines):
    eager, graphed = engines[160]
    pcms = [int16(speechlike(n, seed=i)) for i, n in enumerate([7000, 19000, 33000, 48000, 12000])]
    references = []
    for pcm in pcms:
        state = eager.new_stream()
        eager.accept(state, pcm)
        references.append(eager.finalize(state))
    scheduler = StreamScheduler(graphed)
    ids = [scheduler.join() for _ in pcms]
    for offset in range(0, max(len(p) for p in pcms), 640):
        for stream_id, pcm in zip(ids, pcms):
            if offset < len(pcm):
                scheduler.push(stream_id, pcm[offset : offset + 640])
        scheduler.tick()
    while scheduler.pending():
        scheduler.tick()
    finals = scheduler.finalize(ids)
    assert [finals[i] for i in ids] == references


def test_graphed_bf16_single_stream_equals_eager_bf16(tmp_path_factory):
    """bf16 autocast with the fast path's bf16 cache pools: still the eager path's tokens."""
    path = tiny_nemo_once(tmp_path_factory.mktemp("nemo_bf16"))
    eager = NemotronStreamingEngine.load(path, 160, "cuda", precision="bf16", fast=False)
    graphed = NemotronStreamingEngine.load(path, 160, "cuda", precision="bf16", fast=True)
    assert graphed._stepper.cache_dtype == torch.bfloat16
    for seconds in (0.7, 2.3, 4.4):
        pcm = int16(speechlike(int(seconds * 16000), seed=7 + int(seconds * 10)))
        texts = [transcribe(engine, pcm) for engine in (eager, graphed)]
        assert texts[0] and texts[0] == texts[1], seconds


def test_graphed_fused_batches_equal_eager_alone(engines, tmp_path_factory):
    """Batches with their elementwise work compiled (Triton kernels) and captured in the graphs:
    every turn is eager NeMo's alone (fp32), and one stream's too (it never runs compiled)."""
    from bench.asr_graph_bench import turns_batched
    from processors.nemotron import fused

    eager = engines[160][0]
    path = tiny_nemo_once(tmp_path_factory.mktemp("nemo_fused"))
    graphed = NemotronStreamingEngine.load(path, 160, "cuda", precision="fp32", fast=True, cuda_graphs=True, fuse=True)
    pcms = [int16(speechlike(n, seed=60 + i)) for i, n in enumerate([9000, 21000, 30000, 14000, 26000])]
    references = [transcribe(eager, pcm) for pcm in pcms]
    assert turns_batched(graphed, pcms) == references
    assert transcribe(graphed, pcms[2]) == references[2]
    assert fused.failed() is None and "cuda graphs" in repr(graphed)


def test_second_engine_on_a_captured_model_is_refused_until_close(engines):
    from processors.errors import SetupError

    eager, graphed = engines[160]
    model = graphed.model
    pcm = int16(speechlike(30000, seed=5))

    def turn(engine):
        state = engine.new_stream()
        engine.accept(state, pcm)
        return engine.finalize(state)

    before = turn(graphed)
    with pytest.raises(SetupError, match="close"):
        NemotronStreamingEngine.from_model(model, 160, "cuda", precision="fp32", fast=True)
    graphed.close()
    graphed.close()  # idempotent
    assert turn(graphed) == before  # still serves, without graphs
    again = NemotronStreamingEngine.from_model(model, 160, "cuda", precision="fp32", fast=True)
    assert "cuda graphs" in repr(again) and turn(again) == before


@pytest.mark.parametrize("frames", [2, 6])
def test_ring_kernel_equals_pytorch_ring_attention(tmp_path_factory, frames):
    """The Triton kernel (scores, masked softmax and mix over rings read by slot) against the same
    folded attention in PyTorch products, bf16 on the GPU: partly filled and rotated rings, and
    the chunked-limited mask of a longer final step."""
    from processors.nemotron import ring_kernel
    from processors.nemotron.attention import ring_attention
    from tests.ring_case import ring_case

    if ring_kernel.triton is None:
        pytest.skip("Triton is not installed")
    path = tiny_nemo_once(tmp_path_factory.mktemp("nemo_kernel"))
    engine = NemotronStreamingEngine.load(path, 160, "cuda", precision="bf16", fast=True)
    encoder = engine.model.encoder
    attention = encoder.layers[1].self_attn
    x, _, (pool, rows), pos_emb, index = ring_case(encoder, [0, 3, 69, 70, 71, 500], frames, torch.Generator().manual_seed(5), "cuda")
    pool = pool.to(torch.bfloat16)
    assert ring_kernel.usable(x, pool, attention.h * frames)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused = ring_attention(attention, x, pool, rows, pos_emb, index, kernel=True)
        plain = ring_attention(attention, x, pool, rows, pos_emb, index, kernel=False)
    assert torch.allclose(fused.float(), plain.float(), rtol=3e-2, atol=3e-2), (fused - plain).abs().max()
    assert not torch.allclose(fused.float(), torch.zeros_like(fused.float()))

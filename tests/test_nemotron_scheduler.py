"""The fast path (slot pools, static shapes, unrolled greedy search) and the multi-stream
scheduler against the eager NeMo path, token for token, on the tiny random model (CPU).

The eager engine (``conformer_stream_step`` per stream) is the reference; NeMo's own offline
pass is in turn the eager engine's reference (tests/test_nemotron_engine.py). With character
labels equal text means equal token ids. The CUDA-graph capture of the same steps is tested in
tests/test_nemotron_graphs.py (GPU only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.asr_graph_bench import turns_batched
from processors.nemotron.engine import CHUNK_MS_TO_RIGHT_CONTEXT, NemotronStreamingEngine
from processors.nemotron.scheduler import StreamScheduler, UnknownStreamError
from bench.nemo_models import speechlike, tiny_nemo_once
from tests.ring_case import ring_case

CHUNKS = sorted(CHUNK_MS_TO_RIGHT_CONTEXT)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_nemo_once(tmp_path_factory.mktemp("nemo"))


@pytest.fixture(scope="module")
def eager(model_path) -> dict[int, NemotronStreamingEngine]:
    return {ms: NemotronStreamingEngine.load(model_path, ms, "cpu") for ms in CHUNKS}


@pytest.fixture(scope="module")
def fast(model_path) -> dict[int, NemotronStreamingEngine]:
    return {ms: NemotronStreamingEngine.load(model_path, ms, "cpu", fast=True) for ms in CHUNKS}


def int16(samples: np.ndarray) -> np.ndarray:
    return np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)


def eager_turn(engine, pcm, pad_ms=None) -> tuple[list[str], str]:
    """The reference: one stream alone, every chunk stepped as soon as it is complete."""
    state = engine.new_stream()
    partials = []
    for i in range(0, len(pcm), 320):
        engine.feed(state, pcm[i : i + 320])
        while engine.ready(state):
            text = engine.step([state])[0]
            if text is not None:
                partials.append(text)
    return partials, engine.finalize(state, pad_ms=pad_ms)


def test_engines_are_in_the_modes_asked_for(eager, fast):
    assert not eager[160].fast and fast[160].fast
    assert "static" in repr(fast[160]) and "eager" in repr(eager[160])
    assert fast[160].bytes_per_stream > 0 and eager[160].bytes_per_stream is None


@pytest.mark.parametrize("chunk_ms", CHUNKS)
def test_fast_path_equals_eager_for_lengths_and_frame_sizes(eager, fast, chunk_ms):
    rng = np.random.default_rng(chunk_ms + 1)
    sizes = [int(x) for x in rng.integers(1, 1500, size=40)]
    for seconds in (0.05, 0.43, 1.61, 3.3):
        pcm = int16(speechlike(int(seconds * 16000), seed=int(seconds * 10) + 1))
        reference = eager_turn(eager[chunk_ms], pcm)
        assert reference[1], "an empty reference would prove little"
        for frame_sizes in ([320], sizes):
            state, partials, i, k = fast[chunk_ms].new_stream(), [], 0, 0
            while i < len(pcm):
                size = frame_sizes[k % len(frame_sizes)]
                text = fast[chunk_ms].accept(state, pcm[i : i + size])
                i, k = i + size, k + 1
                if text is not None:
                    partials.append(text)
            final = fast[chunk_ms].finalize(state)
            assert final == reference[1], (seconds, frame_sizes[:3])
            if frame_sizes == [320]:  # one chunk per accept at most: the same partials
                assert partials == reference[0]


def test_final_after_feeding_without_steps_equals_eager(eager, fast):
    """Audio fed but never stepped: finalize catches up with ordinary chunks, then the last one."""
    pcm = int16(speechlike(3 * 16000 + 777, seed=12))
    reference = eager_turn(eager[160], pcm, pad_ms=0)[1]
    states = [fast[160].new_stream() for _ in range(3)]
    for state, cut in zip(states, (0, 16000, len(pcm))):
        fast[160].accept(state, pcm[:cut])
        fast[160].feed(state, pcm[cut:])
    assert fast[160].finalize_many(states, pad_ms=0) == [reference] * 3


@pytest.mark.parametrize("chunk_ms", [80, 160, 1120])
def test_scheduler_streams_join_leave_and_equal_eager_alone(eager, fast, chunk_ms):
    """Calls join, speak several turns and leave at different times, with different frame
    sizes; every turn's partials and final equal the same audio run alone through eager NeMo."""
    rng = np.random.default_rng(chunk_ms)
    scheduler = StreamScheduler(fast[chunk_ms])
    # (join tick, [turn lengths in samples], frame size) per call
    calls = [
        (0, [24000, 9000], 320),
        (0, [41000], 480),
        (3, [16000, 20000, 3000], 160),
        (7, [52000], 1000),
        (12, [5000, 30000], 320),
        (12, [12000], 2000),
    ]
    audio = [[int16(speechlike(n, seed=10 * c + t)) for t, n in enumerate(turns)] for c, (_, turns, _) in enumerate(calls)]
    expected = [[eager_turn(eager[chunk_ms], pcm) for pcm in turns] for turns in audio]
    got: list[list[tuple[list[str], str]]] = [[] for _ in calls]
    ids: list[int | None] = [None] * len(calls)
    position = [(0, 0)] * len(calls)  # (turn, sample)
    partials: dict[int, list[str]] = {}
    tick = 0
    while any(len(g) < len(a) for g, a in zip(got, audio)):
        for c, (start, turns, frame) in enumerate(calls):
            if tick == start:
                ids[c] = scheduler.join()
                partials[ids[c]] = []
            if ids[c] is None or len(got[c]) == len(turns):
                continue
            turn, sample = position[c]
            pcm = audio[c][turn]
            if sample < len(pcm):
                scheduler.push(ids[c], pcm[sample : sample + frame])
                position[c] = (turn, sample + frame)
        # a few ticks of work per 20 ms of audio, sometimes none (a slow worker catches up later)
        for _ in range(int(rng.integers(0, 3))):
            for stream_id, text in scheduler.tick().items():
                partials[stream_id].append(text)
        # turns whose audio is all pushed end once every whole chunk is stepped
        for c in range(len(calls)):
            if ids[c] is None or len(got[c]) == len(calls[c][1]):
                continue
            turn, sample = position[c]
            if sample >= len(audio[c][turn]) and rng.random() < 0.5:
                while scheduler.pending():
                    for stream_id, text in scheduler.tick().items():
                        partials[stream_id].append(text)
                final = scheduler.finalize([ids[c]])[ids[c]]
                got[c].append((partials[ids[c]], final))
                partials[ids[c]] = []
                position[c] = (turn + 1, 0)
                if len(got[c]) == len(calls[c][1]):
                    scheduler.leave(ids[c])
        tick += 1
    assert len(scheduler) == 0
    for c in range(len(calls)):
        for turn, (want, have) in enumerate(zip(expected[c], got[c])):
            assert have[1] == want[1], (c, turn)
            assert have[0] == want[0], (c, turn)


def test_batched_finals_equal_single_finals(eager, fast):
    pcms = [int16(speechlike(n, seed=n % 97)) for n in (3000, 17000, 26000, 39000)]
    references = [eager_turn(eager[560], pcm)[1] for pcm in pcms]
    scheduler = StreamScheduler(fast[560])
    ids = [scheduler.join() for _ in pcms]
    for stream_id, pcm in zip(ids, pcms):
        scheduler.push(stream_id, pcm.tobytes())
    while scheduler.pending():
        scheduler.tick()
    finals = scheduler.finalize(ids)
    assert [finals[i] for i in ids] == references


def test_slots_are_reused_and_freed(fast):
    engine = fast[160]
    scheduler = StreamScheduler(engine)
    pcm = int16(speechlike(8000, seed=3))
    for _ in range(30):
        stream_id = scheduler.join()
        scheduler.push(stream_id, pcm)
        scheduler.tick()
        scheduler.leave(stream_id)
    capacity = engine._stepper._pools.capacity
    assert capacity <= 9  # one stream at a time: the initial pool (8 slots + scratch) never grew
    states = [engine.new_stream() for _ in range(20)]
    for state in states:
        engine.accept(state, pcm)
    slots = {s.lease.slot for s in states}
    assert len(slots) == 20 and 0 not in slots  # distinct, and never the scratch slot
    for state in states:
        state.reset()
    assert all(s.lease is None for s in states)


def test_unknown_stream_is_refused(fast):
    scheduler = StreamScheduler(fast[160])
    with pytest.raises(UnknownStreamError):
        scheduler.push(99, np.zeros(320, dtype=np.int16))
    stream_id = scheduler.join()
    scheduler.leave(stream_id)
    with pytest.raises(UnknownStreamError):
        scheduler.leave(stream_id)


def test_full_house_steps_in_place_and_equals_eager_alone(eager, model_path, monkeypatch):
    """Streams holding slots 1..N in order read their caches as views of the pools (no gather);
    in large parts when N exceeds the batch limit. Every turn still equals eager NeMo alone."""
    from processors.nemotron import graphs

    monkeypatch.setattr(graphs, "IN_PLACE_MIN_BUCKET", 4)
    engine = NemotronStreamingEngine.load(model_path, 160, "cpu", fast=True)
    engine._stepper.max_batch = 4
    pcms = [int16(speechlike(n, seed=30 + n % 7)) for n in (21000, 26000, 30000, 24000, 19000, 28000, 33000, 25000, 22000)]
    references = [eager_turn(eager[160], pcm)[1] for pcm in pcms]
    assert turns_batched(engine, pcms) == references
    starts = {key[3] for key in engine._stepper._runners}
    assert {1, 5} <= starts and None in starts  # two aligned parts in place, the ninth stream gathered


@pytest.mark.parametrize("frames", [2, 6])
def test_ring_attention_equals_nemo_attention(fast, frames):
    """The folded attention over a ring in storage order equals NeMo's layer over the same cache
    in time order (fp32, up to float rounding): partly filled caches, rings at every rotation,
    and (6 frames) the chunked-limited mask cutting the oldest keys."""
    import torch

    from processors.nemotron.attention import ring_attention

    encoder = fast[160].model.encoder
    attention = encoder.layers[1].self_attn
    x, cache, ring, pos_emb, index = ring_case(encoder, [0, 3, 69, 70, 71, 500], frames, torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want, _ = attention(query=x, key=x, value=x, mask=index.logical_mask, pos_emb=pos_emb, cache=cache)
        got = ring_attention(attention, x, *ring, pos_emb, index)
    assert index.logical_mask[0, :, :70].all() and not index.logical_mask[-1, 0, :70].any()  # empty and full caches
    assert index.logical_mask[-1, -1, :4].all() == (frames == 6)  # a later chunk's query no longer sees the oldest
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, torch.zeros_like(got))


def test_one_stream_attention_is_nemo_op_for_op_under_bf16_autocast(fast):
    """One stream reads its ring rotated into time order and takes NeMo's arithmetic: the same
    bits as NeMo's layer given its fp32 cache, though the ring holds bf16 (NeMo's key and value
    projections read the cache cast to bf16). A batch's folded attention is close."""
    import torch

    from processors.nemotron.attention import logical_attention, ring_attention

    encoder = fast[160].model.encoder
    attention = encoder.layers[0].self_attn
    x, cache, ring, pos_emb, index = ring_case(encoder, [37, 90], 2, torch.Generator().manual_seed(3))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = attention(query=x[:1], key=x[:1], value=x[:1], mask=index.logical_mask[:1], pos_emb=pos_emb, cache=cache[:1])
        got = logical_attention(attention, x[:1], cache[:1].to(torch.bfloat16), index.logical_mask[:1], pos_emb)
        assert torch.equal(got, want)
        batch, _ = attention(query=x, key=x, value=x, mask=index.logical_mask, pos_emb=pos_emb, cache=cache)
        folded = ring_attention(attention, x, ring[0].to(torch.bfloat16), ring[1], pos_emb, index)
    assert torch.allclose(folded.float(), batch.float(), rtol=5e-2, atol=5e-2)


def test_fused_batches_equal_eager_alone(eager, model_path, monkeypatch):
    """Batches whose elementwise work runs compiled (torch.compile, ``fuse=True``) give every
    turn eager NeMo gives alone (fp32, CPU: inductor's C++ kernels; on a GPU its Triton ones)."""
    from processors.nemotron import fused

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failed", [])
    engine = NemotronStreamingEngine.load(model_path, 160, "cpu", fast=True, fuse=True)
    pcms = [int16(speechlike(n, seed=40 + n % 5)) for n in (9000, 23000, 16000)]
    references = [eager_turn(eager[160], pcm)[1] for pcm in pcms]
    assert turns_batched(engine, pcms) == references
    assert fused.failed() is None
    assert len(fused._compiled) >= 5  # the layer's pieces, the attention's and the greedy search's ran compiled


def test_a_piece_that_fails_to_compile_runs_as_written(eager, model_path, monkeypatch):
    """A compiler fault costs speed, not the call: the piece runs uncompiled, every later piece
    too, with one warning; the turns are eager NeMo's."""
    import torch
    from loguru import logger

    from processors.nemotron import fused

    def broken(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler")  # what inductor raises without a toolchain, in short
        return call

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failed", [])
    monkeypatch.setattr(torch, "compile", broken)
    warnings = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        engine = NemotronStreamingEngine.load(model_path, 160, "cpu", fast=True, fuse=True)
        pcms = [int16(speechlike(n, seed=50 + n % 3)) for n in (12000, 20000)]
        references = [eager_turn(eager[160], pcm)[1] for pcm in pcms]
        assert turns_batched(engine, pcms) == references
    finally:
        logger.remove(sink)
    assert "no C++ compiler" in fused.failed()
    assert sum("runs unfused" in w for w in warnings) == 1

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

from processors.nemotron.engine import CHUNK_MS_TO_RIGHT_CONTEXT, NemotronStreamingEngine
from processors.nemotron.scheduler import StreamScheduler, UnknownStreamError
from processors.nemotron.tiny import speechlike, tiny_nemo_once

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


@pytest.fixture(scope="module")
def fast_kv(model_path) -> dict[int, NemotronStreamingEngine]:
    """The fast path with caches of projected attention keys and values."""
    return {ms: NemotronStreamingEngine.load(model_path, ms, "cpu", fast=True, project_kv=True) for ms in CHUNKS}


BOTH_FAST = pytest.mark.parametrize("fast_engines", ["fast", "fast_kv"])


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


def test_engines_are_in_the_modes_asked_for(eager, fast, fast_kv):
    assert not eager[160].fast and fast[160].fast
    assert "static" in repr(fast[160]) and "eager" in repr(eager[160])
    assert "projected kv" in repr(fast_kv[160]) and "projected" not in repr(fast[160])
    assert fast[160].bytes_per_stream > 0 and eager[160].bytes_per_stream is None
    assert fast_kv[160].bytes_per_stream > fast[160].bytes_per_stream  # keys and values: twice the attention cache


@BOTH_FAST
@pytest.mark.parametrize("chunk_ms", CHUNKS)
def test_fast_path_equals_eager_for_lengths_and_frame_sizes(eager, request, fast_engines, chunk_ms):
    fast = request.getfixturevalue(fast_engines)
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


@BOTH_FAST
@pytest.mark.parametrize("chunk_ms", [80, 160, 1120])
def test_scheduler_streams_join_leave_and_equal_eager_alone(eager, request, fast_engines, chunk_ms):
    """Calls join, speak several turns and leave at different times, with different frame
    sizes; every turn's partials and final equal the same audio run alone through eager NeMo."""
    fast = request.getfixturevalue(fast_engines)
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


@pytest.mark.parametrize("batch", [1, 3])
def test_lean_cache_attention_equals_nemo_attention_under_bf16_autocast(fast, batch):
    """The fast path's cached attention (bf16 cache, no fp32 round trips) against NeMo's layer.

    NeMo's layer gets an fp32 cache, ours the same cache rounded to bf16: under bf16 autocast
    both reach the key/value projections as the same bf16 values. At batch 1 every op is
    NeMo's, so the bits are equal; a batch computes the position scores as one product per
    head, equal up to float rounding. Without autocast (fp32) the cache path is NeMo's.
    """
    import torch
    from nemo.collections.asr.parts.submodules.multi_head_attention import RelPositionMultiHeadAttention

    from processors.nemotron.attention import cached_attention

    encoder = fast[160].model.encoder
    attention = encoder.layers[0].self_attn
    assert type(attention) is RelPositionMultiHeadAttention
    gen = torch.Generator().manual_seed(3)
    width, cached, new = encoder.d_model, encoder.streaming_cfg.last_channel_cache_size, 2
    query = torch.randn(batch, new, width, generator=gen)
    cache = torch.randn(batch, cached, width, generator=gen)
    _, pos_emb = encoder.pos_enc(x=torch.zeros(1, new, width), cache_len=cached)
    mask = torch.zeros(batch, new, cached + new, dtype=torch.bool)
    mask[-1, :, :5] = True  # a stream with a shorter history

    def same(a, b):
        return torch.equal(a, b) if batch == 1 else torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_nemo, cache_nemo = attention(query=query, key=query, value=query, mask=mask, pos_emb=pos_emb, cache=cache)
        out_ours, cache_ours = cached_attention(attention, query, query, query, mask, pos_emb, cache.to(torch.bfloat16))
    assert cache_ours.dtype == torch.bfloat16
    assert torch.equal(cache_ours, cache_nemo.to(torch.bfloat16))
    assert same(out_ours, out_nemo)
    with torch.inference_mode():
        out_nemo, cache_nemo = attention(query=query, key=query, value=query, mask=mask, pos_emb=pos_emb, cache=cache)
        out_ours, cache_ours = cached_attention(attention, query, query, query, mask, pos_emb, cache)
    assert torch.equal(cache_ours, cache_nemo)
    assert torch.equal(out_ours, out_nemo) if batch == 1 else torch.allclose(out_ours, out_nemo, rtol=1e-5, atol=1e-5)


def test_projected_kv_attention_equals_nemo_attention(fast):
    """A cache of projected keys and values gives NeMo's layer output (fp32, up to the rounding
    of projecting rows in a smaller product) and the projection of NeMo's next cache."""
    import torch

    from processors.nemotron.attention import PROJECT_KV_ATTR, cached_attention

    encoder = fast[160].model.encoder
    attention = encoder.layers[1].self_attn
    gen = torch.Generator().manual_seed(5)
    width, cached, new, batch = encoder.d_model, encoder.streaming_cfg.last_channel_cache_size, 2, 3
    query = torch.randn(batch, new, width, generator=gen)
    cache = torch.randn(batch, cached, width, generator=gen)
    _, pos_emb = encoder.pos_enc(x=torch.zeros(1, new, width), cache_len=cached)
    mask = torch.zeros(batch, new, cached + new, dtype=torch.bool)
    mask[-1, :, :5] = True
    with torch.inference_mode():
        out_nemo, cache_nemo = attention(query=query, key=query, value=query, mask=mask, pos_emb=pos_emb, cache=cache)
        projected = torch.cat([attention.linear_k(cache), attention.linear_v(cache)], dim=-1)
        setattr(attention, PROJECT_KV_ATTR, True)
        try:
            out_ours, cache_ours = cached_attention(attention, query, query, query, mask, pos_emb, projected)
        finally:
            delattr(attention, PROJECT_KV_ATTR)
        want_cache = torch.cat([attention.linear_k(cache_nemo), attention.linear_v(cache_nemo)], dim=-1)
    assert cache_ours.shape == (batch, cached, 2 * width)
    assert torch.allclose(cache_ours, want_cache, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out_ours, out_nemo, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_ours, torch.zeros_like(out_ours))

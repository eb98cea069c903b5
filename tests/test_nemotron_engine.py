"""The streaming engine on a tiny random cache-aware FastConformer RNN-T (real NeMo code, CPU).

The reference is NeMo's own whole-utterance pass (``offline_text``). The tiny model's joint is
calibrated so its characters depend on the audio; with character labels equal text means equal
token ids. Nothing here compares against hard-coded text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soxr
import torch

from processors.errors import SetupError
from processors.nemotron.audio import AudioFormatError, SampleWindow
from processors.nemotron.engine import CHUNK_MS_TO_RIGHT_CONTEXT, NemotronStreamingEngine
from bench.nemo_models import offline_text, save_random_nemo, speechlike, tiny_nemo_once

CHUNKS = sorted(CHUNK_MS_TO_RIGHT_CONTEXT)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_nemo_once(tmp_path_factory.mktemp("nemo"))


@pytest.fixture(scope="module")
def engines(model_path) -> dict[int, NemotronStreamingEngine]:
    return {ms: NemotronStreamingEngine.load(model_path, ms, "cpu") for ms in CHUNKS}


def int16(samples: np.ndarray) -> np.ndarray:
    return np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)


def stream(engine, pcm, frame_sizes, pad_ms=0, state=None) -> str:
    """Feed ``pcm`` in frames of the given sizes (cycled), then finalize."""
    state = state or engine.new_stream()
    i, k = 0, 0
    while i < len(pcm):
        size = frame_sizes[k % len(frame_sizes)]
        engine.accept(state, pcm[i : i + size])
        i, k = i + size, k + 1
    return engine.finalize(state, pad_ms=pad_ms)


@pytest.mark.parametrize("chunk_ms", CHUNKS)
def test_streaming_equals_offline_for_lengths_and_frame_sizes(engines, chunk_ms):
    engine = engines[chunk_ms]
    rng = np.random.default_rng(chunk_ms)
    random_sizes = [int(x) for x in rng.integers(1, 1200, size=50)]
    for seconds in (0.07, 0.41, 1.37, 3.05):
        pcm = int16(speechlike(int(seconds * 16000), seed=int(seconds * 10)))
        reference, _ = offline_text(engine.model, pcm / 32768.0)
        assert reference, "the reference should not be empty, or the comparison proves little"
        for sizes in ([320], [160 * 7 + 3], random_sizes, [len(pcm)]):
            assert stream(engine, pcm, sizes) == reference, (seconds, sizes[:3])


def test_every_chunk_size_has_its_own_lookahead(engines):
    """Different right contexts give different encoder outputs, so the chunk setting is live."""
    pcm = int16(speechlike(3 * 16000, seed=3))
    texts = {ms: stream(engines[ms], pcm, [320]) for ms in CHUNKS}
    assert len(set(texts.values())) > 1


@pytest.mark.parametrize("remainder", range(1, 9))
def test_80ms_tail_frames_are_not_lost(engines, remainder):
    """After the last whole 80 ms chunk, 1..8 mel frames remain; each must reach the encoder."""
    engine = engines[80]
    mel_frames = 1 + 8 * 20 + remainder  # first chunk is 1 frame, then 8 per chunk
    pcm = int16(speechlike(mel_frames * 160 + 37, seed=remainder))
    reference, encoder_frames = offline_text(engine.model, pcm / 32768.0)
    seen = []
    original = engine.model.encoder.cache_aware_stream_step

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(int(out[1][0]))
        return out

    engine.model.encoder.cache_aware_stream_step = counting
    try:
        text = stream(engine, pcm, [320])
    finally:
        del engine.model.encoder.cache_aware_stream_step
    assert sum(seen) == encoder_frames
    assert text == reference


@pytest.mark.parametrize("chunk_ms", [80, 560])
def test_streamed_encoder_output_matches_offline_tensors(engines, chunk_ms):
    engine, model = engines[chunk_ms], engines[chunk_ms].model
    pcm = int16(speechlike(2 * 16000 + 555, seed=5))
    chunks = []
    original = model.encoder.cache_aware_stream_step

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        chunks.append(out[0][0, :, : int(out[1][0])].clone())
        return out

    model.encoder.cache_aware_stream_step = recording
    try:
        stream(engine, pcm, [480])
    finally:
        del model.encoder.cache_aware_stream_step
    signal = torch.from_numpy(pcm / 32768.0).float().unsqueeze(0)
    with torch.inference_mode():
        mel, mel_len = model.preprocessor(input_signal=signal, length=torch.tensor([signal.shape[1]]))
        offline, _ = model.encoder(audio_signal=mel, length=mel_len)
    streamed = torch.cat(chunks, dim=1)
    assert streamed.shape == offline[0].shape
    torch.testing.assert_close(streamed, offline[0], atol=1e-4, rtol=1e-4)


def test_finalize_pads_silence_as_right_context(engines):
    engine = engines[160]
    pcm = int16(speechlike(16000 + 999, seed=8))
    padded = np.concatenate([pcm, np.zeros(16 * engine.final_pad_ms, dtype=np.int16)])
    reference, _ = offline_text(engine.model, padded / 32768.0)
    state = engine.new_stream()
    engine.accept(state, pcm)
    assert engine.finalize(state) == reference  # default pad: one chunk of silence


@pytest.mark.parametrize("chunk_ms", [80, 1120])
def test_batched_streams_equal_single_streams(engines, chunk_ms):
    """Streams of different ages and lengths stepped together give each stream's own text."""
    engine = engines[chunk_ms]
    audios = [int16(speechlike(n, seed=i)) for i, n in enumerate([9000, 30000, 41234, 16000, 52000])]
    starts = [0, 0, 3200, 8000, 19200]  # later streams join while others are in steady state
    singles = [stream(engine, pcm, [320]) for pcm in audios]
    states = [engine.new_stream() for _ in audios]
    finished = [None] * len(audios)
    for t in range(0, max(s + len(a) for s, a in zip(starts, audios)) + 320, 320):
        for i, (pcm, start) in enumerate(zip(audios, starts)):
            if finished[i] is None and start <= t:
                engine.feed(states[i], pcm[t - start : t - start + 320])
                if t - start + 320 >= len(pcm):
                    finished[i] = "feeding done"
        while any(engine.ready(s) for s in states):
            engine.step(states)
        for i, state in enumerate(states):
            if finished[i] == "feeding done" and not engine.ready(state):
                finished[i] = engine.finalize(state, pad_ms=0)
    assert finished == singles


def test_step_reports_only_changed_text(engines):
    engine = engines[160]
    state = engine.new_stream()
    engine.feed(state, int16(speechlike(16000, seed=2)))
    results = []
    while engine.ready(state):
        results.append(engine.step([state])[0])
    shown = [r for r in results if r is not None]
    assert shown and all(a != b for a, b in zip(shown, shown[1:]))
    assert shown[-1] == state.text
    assert engine.step([state]) == [None]  # nothing ready: no step, no text


def test_bytes_split_at_odd_offsets_equal_int16_arrays(engines):
    engine = engines[160]
    pcm = int16(speechlike(20000, seed=4))
    raw = pcm.tobytes()
    state = engine.new_stream()
    for i in range(0, len(raw), 333):  # odd sizes split samples between frames
        engine.accept(state, raw[i : i + 333])
    assert engine.finalize(state, pad_ms=0) == stream(engine, pcm, [320])


def test_nan_and_inf_in_float_audio_are_sanitized(engines):
    engine = engines[160]
    audio = speechlike(24000, seed=6)
    broken = audio.copy()
    broken[1000:1100] = np.nan
    broken[5000] = np.inf
    broken[7000] = -np.inf
    broken[9000:9010] = 3.0
    cleaned = np.clip(np.nan_to_num(broken, nan=0.0, posinf=1.0, neginf=-1.0), -1, 1)
    reference, _ = offline_text(engine.model, cleaned)
    state = engine.new_stream()
    for i in range(0, len(broken), 320):
        engine.accept(state, broken[i : i + 320])
    assert torch.isfinite(state.cache_channel).all() and torch.isfinite(state.cache_time).all()
    assert engine.finalize(state, pad_ms=0) == reference


def test_clipped_and_silent_audio(engines):
    engine = engines[160]
    square = np.where(np.sin(np.arange(24000) * 2 * np.pi * 440 / 16000) >= 0, 32767, -32768).astype(np.int16)
    silence = np.zeros(24000, dtype=np.int16)
    for pcm in (square, silence):
        reference, _ = offline_text(engine.model, pcm / 32768.0)
        state = engine.new_stream()
        for i in range(0, len(pcm), 320):
            engine.accept(state, pcm[i : i + 320])
        assert torch.isfinite(state.cache_channel).all()
        assert engine.finalize(state, pad_ms=0) == reference


def test_empty_stream_finalizes_to_nothing(engines):
    engine = engines[80]
    state = engine.new_stream()
    assert engine.finalize(state) == ""
    engine.accept(state, np.zeros(100, dtype=np.int16))  # less than one mel frame
    assert engine.finalize(state, pad_ms=0) == ""


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_sample_rates_are_resampled(engines, rate):
    engine = engines[160]
    audio = speechlike(2 * rate + 17, seed=7, sample_rate=rate)
    reference, _ = offline_text(engine.model, soxr.resample(audio, rate, 16000, quality="HQ"))
    state = engine.new_stream(sample_rate=rate)
    for i in range(0, len(audio), rate // 50):
        engine.accept(state, audio[i : i + rate // 50])
    assert engine.finalize(state, pad_ms=0) == reference


def test_unusable_audio_is_refused_clearly(engines):
    engine = engines[160]
    with pytest.raises(AudioFormatError, match="sample rate"):
        engine.new_stream(sample_rate=0)
    state = engine.new_stream()
    with pytest.raises(AudioFormatError, match="mono"):
        engine.accept(state, np.zeros((320, 2), dtype=np.int16))
    with pytest.raises(AudioFormatError, match="dtype"):
        engine.accept(state, np.zeros(320, dtype=np.int32))


def test_long_stream_keeps_state_size_bounded(engines):
    """Three minutes of noisy audio: caches stay fixed and the sample window never exceeds one
    chunk of pending samples plus its history, so nothing grows with the length of the call."""
    engine = engines[1120]
    state = engine.new_stream()
    noise = int16(speechlike(16000 * 10, seed=9))
    sizes = []
    for _ in range(18):
        for i in range(0, len(noise), 3200):
            engine.accept(state, noise[i : i + 3200])
            sizes.append((state.nbytes - state.window.nbytes, state.window.nbytes))
    assert state.audio_s == pytest.approx(180)
    cache_sizes = {c for c, _ in sizes[20:]}
    assert len(cache_sizes) == 1  # fixed-size encoder caches
    window_limit = 4 * (16 * engine.chunk_ms + 3200 + 11 * 160 + 256)
    assert max(w for _, w in sizes) <= window_limit
    assert max(sizes[-300:]) == max(sizes[:300])  # no drift from the first minute to the last
    assert state.num_tokens > 0  # the turn's tokens are the only thing that grows
    engine.finalize(state)
    assert state.num_tokens == 0 and state.window.total == 0


# ----- start-up errors ------------------------------------------------------------------------


def test_missing_or_wrong_model_path_names_the_setting(tmp_path):
    not_nemo = tmp_path / "model.nemo"
    not_nemo.write_text("not a model")
    wrong_suffix = tmp_path / "model.ckpt"
    wrong_suffix.write_bytes(b"\0" * 10)
    for path in (None, tmp_path / "absent.nemo", tmp_path, not_nemo, wrong_suffix):
        with pytest.raises(SetupError, match="STT_MODEL_PATH"):
            NemotronStreamingEngine.load(path, 160, "cpu")


def test_unsupported_chunk_size_names_the_setting(model_path):
    with pytest.raises(SetupError, match="ASR_CHUNK_MS.*80, 160, 560, 1120"):
        NemotronStreamingEngine.load(model_path, 320, "cpu")


def test_bad_device_names_the_setting(model_path):
    with pytest.raises(SetupError, match="ASR_DEVICE"):
        NemotronStreamingEngine.load(model_path, 160, "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SetupError, match="ASR_DEVICE"):
            NemotronStreamingEngine.load(model_path, 160, "cuda")


def test_model_without_streaming_or_this_chunk_is_refused(tmp_path, monkeypatch):
    import bench.nemo_models as nemo_tiny

    config = nemo_tiny.model_config("tiny")
    config["encoder"]["att_context_size"] = [[70, 1]]
    monkeypatch.setattr(nemo_tiny, "model_config", lambda size="tiny": config)
    only_160 = save_random_nemo(tmp_path / "only160.nemo")
    with pytest.raises(SetupError, match="ASR_CHUNK_MS.*trained for 160 ms"):
        NemotronStreamingEngine.load(only_160, 80, "cpu")
    config["encoder"]["att_context_style"] = "regular"
    config["encoder"]["att_context_size"] = [-1, -1]
    offline_only = save_random_nemo(tmp_path / "offline.nemo")
    with pytest.raises(SetupError, match="STT_MODEL_PATH.*not a cache-aware"):
        NemotronStreamingEngine.load(offline_only, 160, "cpu")


def test_the_sample_window_keeps_its_views_and_its_values_across_appends():
    """A slice taken before later appends and forgets stays what it was (the mel batch of a step
    reads views), and every slice equals the same samples kept by concatenation."""
    rng = np.random.default_rng(3)
    window, every = SampleWindow(), np.zeros(0, dtype=np.float32)
    views = []
    for size in [2560] * 12 + [1, 0, 17, 30000, 2560, 2560]:
        chunk = rng.standard_normal(size).astype(np.float32)
        window.append(chunk)
        every = np.concatenate([every, chunk])
        start = max(window.base, window.total - 6000)
        view = window.slice(start, window.total)
        views.append((view, every[start:window.total].copy()))
        window.forget_before(window.total - 4000)
    for view, expected in views:
        np.testing.assert_array_equal(view, expected)
    assert window.nbytes == 4 * 4000


def test_int16_pcm_becomes_the_same_floats_as_a_division():
    from processors.nemotron.audio import pcm_to_float

    pcm = np.array([-32768, -1, 0, 1, 12345, 32767], dtype=np.int16)
    as_bytes, carry = pcm_to_float(pcm.tobytes() + b"\x07")
    as_array, _ = pcm_to_float(pcm)
    np.testing.assert_array_equal(as_bytes, pcm.astype(np.float32) / 32768.0)
    np.testing.assert_array_equal(as_array, pcm.astype(np.float32) / 32768.0)
    assert carry == b"\x07" and as_bytes.dtype == np.float32

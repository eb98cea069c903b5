"""InputAudioGuard: only whole mono samples at the input rate go on to VAD and STT."""

from __future__ import annotations

import numpy as np
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test

from processors.audio_guard import InputAudioGuard


async def guarded(*frames: InputAudioRawFrame) -> list[InputAudioRawFrame]:
    down, _ = await run_test(
        InputAudioGuard(),
        frames_to_send=list(frames),
        expected_down_frames=None,
        pipeline_params=PipelineParams(audio_in_sample_rate=16000),
    )
    return [f for f in down if isinstance(f, InputAudioRawFrame)]


def tone(n: int, rate: int = 16000) -> np.ndarray:
    return (8000 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.int16)


async def test_healthy_frames_pass_untouched():
    pcm = tone(320).tobytes()
    (out,) = await guarded(InputAudioRawFrame(pcm, 16000, 1))
    assert out.audio == pcm and out.sample_rate == 16000


async def test_an_odd_frame_loses_its_stray_byte_and_the_next_frame_stays_aligned():
    pcm = tone(320).tobytes()
    first, second = await guarded(InputAudioRawFrame(pcm + b"\x7f", 16000, 1), InputAudioRawFrame(pcm, 16000, 1))
    assert first.audio == pcm and second.audio == pcm


async def test_stereo_and_other_rates_become_mono_at_the_input_rate():
    source = tone(4800, 48000)  # 100 ms at 48 kHz, sent as five stereo frames
    frames = [
        InputAudioRawFrame(np.repeat(source[i : i + 960], 2).tobytes(), 48000, 2) for i in range(0, 4800, 960)
    ]
    out = await guarded(*frames)
    assert all(f.sample_rate == 16000 and f.num_channels == 1 for f in out)
    samples = np.concatenate([np.frombuffer(f.audio, dtype=np.int16) for f in out])
    assert 1400 <= len(samples) <= 1600, "one stream resampler: only its filter delay is held back"
    spectrum = np.abs(np.fft.rfft(samples[-1024:] * np.hanning(1024)))
    assert abs(np.argmax(spectrum) * 16000 / 1024 - 440) < 20


def samples_of(frames: list[InputAudioRawFrame]) -> np.ndarray:
    return np.concatenate([np.frombuffer(f.audio, dtype=np.int16) for f in frames])


async def test_the_end_of_a_run_at_another_rate_is_let_out_when_the_input_rate_returns():
    source = tone(4800, 48000)  # 100 ms at 48 kHz
    frames = [InputAudioRawFrame(source[i : i + 960].tobytes(), 48000, 1) for i in range(0, 4800, 960)]
    silence = InputAudioRawFrame(bytes(640), 16000, 1)
    out = await guarded(*frames, silence)
    assert out[-1].audio == silence.audio, "the healthy frame passes untouched, after the tail"
    resampled = samples_of(out[:-1])
    assert abs(len(resampled) - 1600) <= 2, f"{len(resampled)} samples for 100 ms: the resampler kept some"


async def test_a_later_run_at_that_rate_starts_with_no_audio_from_the_earlier_one():
    loud = [InputAudioRawFrame(tone(960, 48000).tobytes(), 48000, 1) for _ in range(5)]
    quiet = [InputAudioRawFrame(bytes(1920), 48000, 1) for _ in range(5)]
    between = InputAudioRawFrame(bytes(640), 16000, 1)
    out = await guarded(*loud, between, *quiet)
    later = samples_of(out[[f.id for f in out].index(between.id) + 1 :])
    assert np.abs(later).max() < 50, "stale audio from the earlier run at 48 kHz"


async def test_a_change_between_two_other_rates_keeps_the_first_runs_end():
    low = [InputAudioRawFrame(tone(160, 8000).tobytes(), 8000, 1) for _ in range(10)]  # 200 ms
    high = [InputAudioRawFrame(tone(960, 48000).tobytes(), 48000, 1) for _ in range(10)]  # 200 ms
    out = await guarded(*low, *high, InputAudioRawFrame(bytes(640), 16000, 1))
    assert abs(len(samples_of(out[:-1])) - 6400) <= 4, "audio lost at the change of rate"

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

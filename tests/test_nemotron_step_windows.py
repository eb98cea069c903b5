"""The vectorised step arithmetic of the streaming engine: which frames and samples each stream's
step reads (``step_windows``), and int16 PCM written into the sample window as it arrives."""

from __future__ import annotations

import numpy as np
import pytest

from processors.nemotron.audio import SampleWindow
from processors.nemotron.stream import FrameGeometry, step_windows

# The tiny test model at 160 ms: 10 ms hop, 512-point FFT, 2 frames of window reach, 9 history frames.
GEOMETRY = FrameGeometry(hop=160, half_fft=256, left_frames=2, pre_cache=9)

# (frames done, end frame, samples received) -> (window start, samples, skip, input frames)
TABLE = [
    ((0, 9, 2000), (0, 1536, 0, 9)),  # first step: nothing before frame 0
    ((3, 11, 3000), (0, 1856, 0, 11)),  # fewer history frames than pre_cache: from frame 0
    ((9, 25, 5000), (0, 4096, 0, 25)),  # exactly pre_cache done: history starts at frame 0
    ((10, 26, 9000), (0, 4256, 1, 25)),  # history starts inside the window's reach
    ((25, 41, 7000), (2240, 4416, 2, 25)),  # steady state
    ((25, 40, 6500), (2240, 4256, 2, 24)),  # a final step: the audio ends before the last window
]


@pytest.mark.parametrize(("stream", "expected"), TABLE)
def test_each_stream_alone(stream, expected):
    done, end, total = (np.array([v]) for v in stream)
    w = step_windows(GEOMETRY, done, end, total)
    assert (w["window_start"][0], w["sizes"][0], w["skip"][0], w["count"][0]) == expected


def test_a_batch_is_its_streams_side_by_side():
    done, end, total = (np.array(column) for column in zip(*(stream for stream, _ in TABLE)))
    w = step_windows(GEOMETRY, done, end, total)
    assert list(zip(w["window_start"], w["sizes"], w["skip"], w["count"])) == [expected for _, expected in TABLE]


def test_int16_appended_to_the_window_equals_the_division_and_float_appends():
    rng = np.random.default_rng(5)
    pcm16, floats = SampleWindow(), SampleWindow()
    for size in [2560] * 9 + [1, 0, 17, 30000, 2560]:
        pcm = rng.integers(-32768, 32768, size=size, dtype=np.int16)
        pcm16.append_pcm16(pcm)
        floats.append(pcm.astype(np.float32) / 32768.0)
        pcm16.forget_before(pcm16.total - 5000)
        floats.forget_before(floats.total - 5000)
        start = max(pcm16.base, pcm16.total - 7000)
        np.testing.assert_array_equal(pcm16.slice(start, pcm16.total), floats.slice(start, floats.total))
    assert pcm16.nbytes == floats.nbytes == 4 * 5000

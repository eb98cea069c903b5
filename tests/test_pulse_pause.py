"""Pause and resume at a real PulseAudio sink (the pause-then-decide barge-in, issue 10).

Three seconds of a rising chirp go to the rig's echo-cancel sink; playback is paused one second
in and resumed half a second later. At the speaker: silence during the pause, and exactly three
seconds of audio in all, continuing at the frequency where it stopped (nothing lost, nothing
repeated: PulseAudio's buffer is flushed on the pause and its unplayed audio replayed).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest
from pipecat.frames.frames import InterruptionFrame

from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

from tests.recording_waits import LOUD_DBFS, loud_at, loud_then_quiet, recorded_past
from tests.test_pulse_transport import IN_RATE, OUT_RATE, rig_params, tts_frames
from transports.pulse import PulseAudioTransport
from transports.rig.pulse import PulseRig, pulseaudio_available
from transports.rig.audio import rms_dbfs

pytestmark = pytest.mark.skipif(not pulseaudio_available(), reason="pulseaudio/pactl not installed")

SECONDS = 3.0


def chirp(seconds: float, rate: int, f0: float = 300.0, f1: float = 1500.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (0.25 * 32767 * np.sin(phase)).astype(np.int16)


def loud_seconds(samples: np.ndarray, rate: int) -> float:
    """Seconds of signal, to the sample: a 5 ms running peak of |x| above -30 dBFS."""
    width = rate // 200
    peaks = np.lib.stride_tricks.sliding_window_view(np.abs(samples.astype(np.int32)), width).max(axis=1)
    return float((peaks > 1000).sum() + width - 1) / rate if (peaks > 1000).any() else 0.0


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


@asynccontextmanager
async def playing(rig):
    """An output-only pipeline on the rig's sink; yields (worker, output transport)."""
    transport = PulseAudioTransport(rig_params(rig, audio_in_enabled=False))
    worker = PipelineWorker(
        Pipeline([transport.output()]),
        params=PipelineParams(audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE),
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.sleep(0.5)
        yield worker, transport.output()
    finally:
        await worker.cancel(reason="test over")
        await asyncio.wait_for(task, 10)


@pytest.fixture(scope="module")
def rig():
    with PulseRig() as r:
        yield r


async def test_pause_then_resume_loses_and_repeats_nothing(rig):
    audio = chirp(SECONDS, OUT_RATE)
    async with playing(rig) as (worker, output):
        # The same audio once without a pause, measured the same way: the reference.
        with rig.record(rig.SPEAKER_MONITOR, sample_rate=OUT_RATE) as reference:
            queued = time.monotonic()
            await worker.queue_frames(tts_frames(audio, chunk_ms=40))
            await loud_then_quiet(reference, queued)
        expected = loud_seconds(reference.recording.between(queued, float("inf")), OUT_RATE)
        with rig.record(rig.SPEAKER_MONITOR, sample_rate=OUT_RATE) as speaker:
            queued = time.monotonic()
            await worker.queue_frames(tts_frames(audio, chunk_ms=40))
            await recorded_past(speaker, await loud_at(speaker, queued) + 0.9)  # a second into it
            paused = time.monotonic()
            await output.pause_playback()
            await asyncio.sleep(0.5)  # the pause itself
            resumed = time.monotonic()
            await output.resume_playback()
            await loud_then_quiet(speaker, resumed)
    rec = speaker.recording
    # Silent once the pause's flush is over: a full run (2 cores) still recorded its tail 30 ms
    # after the pause (-79.5 dBFS over the window from there); how soon the caller hears the stop
    # is the barge-in bench's measure, not this test's.
    during_pause = rec.between(paused + 0.08, resumed)
    assert rms_dbfs(during_pause) < -80, "the sink must be silent while paused"
    total = loud_seconds(rec.between(queued, float("inf")), OUT_RATE)
    print(f"pause/resume at the sink: {total:.3f} s of audio played, {expected:.3f} s without a pause")
    # PulseAudio held ~50 ms when paused: losing or repeating it would show as a 50 ms difference.
    assert total == pytest.approx(expected, abs=0.02), "audio lost or repeated across the pause"
    last = rec.last_loud_time(LOUD_DBFS, queued)
    before = rec.between(paused - 0.06, paused - 0.01)
    after_start = rec.first_loud_time(LOUD_DBFS, resumed)
    after = rec.between(after_start + 0.01, after_start + 0.06)
    assert abs(dominant_hz(before, OUT_RATE) - dominant_hz(after, OUT_RATE)) < 60, "resumed elsewhere"
    assert last > after_start


async def test_interruption_while_paused_drops_the_held_audio(rig):
    audio = chirp(SECONDS, OUT_RATE)
    async with playing(rig) as (worker, output):
        with rig.record(rig.SPEAKER_MONITOR, sample_rate=OUT_RATE) as speaker:
            queued = time.monotonic()
            await worker.queue_frames(tts_frames(audio, chunk_ms=40))
            await recorded_past(speaker, await loud_at(speaker, queued) + 0.9)  # a second into it
            await output.pause_playback()
            await asyncio.sleep(0.3)  # paused a while
            interrupted = time.monotonic()
            await worker.queue_frames([InterruptionFrame()])
            await recorded_past(speaker, time.monotonic() + 1.5)
    rec = speaker.recording
    # Judged from the recording's own timeline: the sink fell silent during the pause (how fast is
    # the pause test's to judge; on a loaded machine the flush took over 30 ms), and nothing of the
    # held audio came after the interruption.
    last = rec.last_loud_time(LOUD_DBFS, queued)
    assert last < interrupted, "the pause did not silence the sink before the interruption"
    assert rms_dbfs(rec.between(interrupted, float("inf"))) < -80, "held audio played after the interruption"

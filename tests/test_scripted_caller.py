"""The one scripted caller and the one frame-time recorder that the demo, the benchmarks and the tests share.

:class:`agent.demo.caller.ScriptedCaller` on a running simulated line (its input and output
transports in a pipecat pipeline): what she says is on her channel, what is played reaches her
ear, and her waits end when they should. :class:`agent.demo.frames.FrameTimes` fed the pushes a
pipeline reports: kept or bounded, counted, Annie speaking or not.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ErrorFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    UserStartedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.filters.identity_filter import IdentityFilter
from pipecat.processors.frame_processor import FrameDirection
from pipecat.workers.runner import WorkerRunner

from agent.demo.caller import ScriptedCaller, poll_until
from agent.demo.frames import FrameTimes
from transports.rig.line import SimLine

OUT_RATE = 24000


def tone(seconds: float, rate: int, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 440 * t) * level * 32767).astype(np.int16)


async def test_the_scripted_caller_hears_the_ear_and_her_own_voice_on_a_running_line():
    line = SimLine(OUT_RATE)
    task = PipelineTask(Pipeline([line.transport.input(), IdentityFilter(), line.transport.output()]),
                        params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=OUT_RATE))
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(task)
    running = asyncio.create_task(runner.run())
    caller = ScriptedCaller(line)
    try:
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        assert not caller.audible_after(t0 - 1) and await caller.wait_silent(0.5, 1.0)  # nothing played yet

        start, end = await caller.play(tone(0.4, 16000))
        assert end - start == pytest.approx(0.4, abs=0.001)
        assert line.caller_busy()
        assert await poll_until(lambda: not line.caller_busy(), 2.0)
        voice = caller.voice_times(t0)
        assert voice.size and abs(voice.min() - start) < 0.1 and abs(voice.max() + 0.01 - start - 0.4) < 0.1
        assert not caller.ear_times(t0).size  # her voice is not at her ear: the line has no echo

        played_at = time.monotonic()
        await task.queue_frame(OutputAudioRawFrame(tone(0.5, OUT_RATE).tobytes(), OUT_RATE, 1))
        assert await poll_until(lambda: caller.audible_after(played_at, margin_s=0.1), 2.0)
        assert not await caller.wait_silent(0.3, 0.2)  # Annie is still audible
        assert await caller.wait_silent(0.3, 3.0)
        assert caller.silent_for(0.3) and not caller.audible_after(time.monotonic())
        ear = caller.ear_times(played_at)
        assert 0.4 <= ear.size * 0.01 <= 0.55, ear.size
    finally:
        await task.cancel()
        await asyncio.wait_for(running, 10)


def pushed(times: FrameTimes, frame, direction=FrameDirection.DOWNSTREAM) -> None:
    processor = IdentityFilter()
    asyncio.run(times.on_push_frame(FramePushed(processor, processor, frame, direction, 0)))


def test_frame_times_bounded_keeps_the_latest_and_counts_every_one():
    times = FrameTimes(keep_last=3)
    for _ in range(5):
        pushed(times, UserStartedSpeakingFrame())
    assert len(times.by_kind["turn_started"]) == 3 and times.counts["turn_started"] == 5
    assert times.last("turn_started") == times.by_kind["turn_started"][-1]
    unbounded = FrameTimes()
    for _ in range(5):
        pushed(unbounded, UserStartedSpeakingFrame())
    assert len(unbounded.by_kind["turn_started"]) == 5


def test_frame_times_knows_when_annie_speaks_and_sees_errors_going_upstream():
    times = FrameTimes()
    assert not times.bot_speaking and times.last("bot_started") is None
    pushed(times, BotStartedSpeakingFrame())
    assert times.bot_speaking
    pushed(times, BotStoppedSpeakingFrame(), FrameDirection.UPSTREAM)  # upstream copies are not noted
    assert times.bot_speaking
    pushed(times, BotStoppedSpeakingFrame())
    assert not times.bot_speaking
    error = ErrorFrame("the TTS server went away")
    pushed(times, error, FrameDirection.UPSTREAM)
    pushed(times, error, FrameDirection.UPSTREAM)  # the same frame at the next hop
    assert times.counts["error"] == 1
    pushed(times, InterruptionFrame(), FrameDirection.UPSTREAM)
    pushed(times, InterruptionFrame())  # the broadcast's other half, at once: one interruption
    assert times.counts["interruption"] == 1

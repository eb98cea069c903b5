"""Run the real call pipeline with a simulated phone line and injected caller turns (tests, benches).

The LLM is the stand-in OpenAI-compatible server on 127.0.0.1 (real HTTP streaming); the
loudspeaker is the simulated sink, which records what the caller actually heard and when. The
caller's turns are injected as the frames VAD and STT would produce, so a test controls the
timing exactly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from pipecat.frames.frames import (
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.filters.identity_filter import IdentityFilter
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner

from agent.config import AgentSettings
from agent.pipeline import CallPipeline, build_call_pipeline
from agent.demo.caller import poll_until
from agent.demo.frames import FrameTimes
from agent.services import build_llm
from transports.rig.simulated import SimulatedPhoneTransport


class FrameLog(FrameTimes):
    """Every frame pushed anywhere in the pipeline, with its time (:class:`FrameTimes` keeping all)."""

    def __init__(self):
        super().__init__(keep_all=True)


class CallHarness:
    def __init__(self, call: CallPipeline, transport: SimulatedPhoneTransport, log: FrameLog, tts: FrameProcessor):
        self.call = call
        self.transport = transport
        self.log = log
        self.tts = tts

    @property
    def loudspeaker(self):
        return self.transport.loudspeaker

    async def send(self, *frames: Frame) -> float:
        await self.call.worker.queue_frames(list(frames))
        return time.monotonic()

    async def caller_says(self, text: str, *, speech_s: float = 0.3, interim: bool = True) -> float:
        """Inject one caller utterance (VAD start, partial, final, VAD stop); returns its onset time."""
        onset = time.monotonic()
        await self.call.worker.queue_frames([VADUserStartedSpeakingFrame(start_secs=0.2)])
        if interim and text:
            await self.call.worker.queue_frames(
                [InterimTranscriptionFrame(text=text.split()[0], user_id="caller", timestamp="")]
            )
        await asyncio.sleep(speech_s)
        frames: list[Frame] = []
        if text:
            frames.append(TranscriptionFrame(text=text, user_id="caller", timestamp="", finalized=True))
        frames.append(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await self.call.worker.queue_frames(frames)
        return onset

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
        if not await poll_until(predicate, timeout, poll_s=0.01):
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        return time.monotonic()

    def audible_since(self, t: float, threshold_rms: float = 200.0) -> float:
        """Seconds of audible audio the loudspeaker played after wall-clock time ``t``."""
        total = 0.0
        for chunk in list(self.loudspeaker.played):
            end = chunk.t + chunk.duration
            if end > t and chunk.rms > threshold_rms:
                total += end - max(chunk.t, t)
        return total

    async def wait_speaking(self, timeout: float = 10.0) -> float:
        start = time.monotonic()
        return await self.wait_until(lambda: self.audible_since(start) > 0.1, timeout, "Annie to speak")

    async def wait_silent(self, quiet_s: float = 0.6, timeout: float = 20.0) -> float:
        """Wait until the loudspeaker has been silent for ``quiet_s``; returns when silence began."""

        def quiet() -> bool:
            until = self.loudspeaker.audible_until()
            return until is None or time.monotonic() - until > quiet_s

        await self.wait_until(quiet, timeout, "Annie to fall silent")
        return self.loudspeaker.audible_until() or time.monotonic()


@asynccontextmanager
async def running_call(
    settings: AgentSettings,
    *,
    llm_base_url: str,
    tts: FrameProcessor,
    stt: FrameProcessor | None = None,
    stt_streams_partials: bool | None = None,
    vad_analyzer=None,
    turn_analyzer=None,
    transport=None,
    frame_log: FrameLog | None = None,
    observers: list | None = None,
):
    """Start the call pipeline, yield a :class:`CallHarness`, then cancel it cleanly.

    ``transport``: the simulated line unless given (a PulseAudio transport, in the fault tests).
    ``observers``: more pipeline observers beside the frame log (the status observer).
    It yields once the ``StartFrame`` has reached the end of the pipeline (every processor
    started); a call that ended by itself before the caller is done fails the ``with`` block.
    """
    transport = transport or SimulatedPhoneTransport()
    log = frame_log or FrameLog()
    call = build_call_pipeline(
        settings,
        transport=transport,
        stt=stt or IdentityFilter(),
        llm=build_llm(settings, base_url=llm_base_url),
        tts=tts,
        vad_analyzer=vad_analyzer,
        turn_analyzer=turn_analyzer,
        observers=[log, *(observers or [])],
        stt_streams_partials=stt_streams_partials,
    )
    started = asyncio.Event()

    async def on_started(_worker, _frame) -> None:
        started.set()

    call.worker.add_event_handler("on_pipeline_started", on_started)
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(call.worker)
    task = asyncio.create_task(runner.run())
    harness = CallHarness(call, transport, log, tts)
    try:
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        yield harness
        assert not task.done(), f"the call ended by itself: {task}"
    finally:
        await call.worker.cancel(reason="test over")
        await asyncio.wait_for(task, 15)

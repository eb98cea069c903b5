"""Operator smoke test of the Chatterbox server: does a cancelled utterance really stop?

It starts a long synthesis through :class:`ChatterboxTTSService` in a small pipeline, cancels it
(an ``InterruptionFrame``, as barge-in sends) 500 ms after the first audio arrived, and checks
that no audio of that utterance comes out afterwards and that this process no longer holds the
connection to the server. The result carries the measured times.

As a preflight gate::

    result = await run_smoke_test("http://127.0.0.1:4123", voice="default")
    if not result.passed:
        print(result.reason)

From a shell: ``python -m processors.chatterbox.smoke --url URL [--voice V]`` (exit status 0 on
pass, 1 on fail). :class:`TTSProbe` is the pipeline harness it uses; tests and ``bench/`` use it
too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from processors.chatterbox.tts import ChatterboxTTSService

LONG_TEXT = (
    "Good morning, this is a long answer read out on purpose, so that there is plenty of speech "
    "still to come when it is cut short. The weather today will be mild with a light breeze. "
    "In the afternoon there may be a little rain, so an umbrella by the door would be wise. "
    "Tomorrow looks brighter, and the weekend should be lovely for a walk in the park."
)


@dataclass
class Arrival:
    """A frame as it passed a recorder, with its arrival time (``time.monotonic()``)."""

    at: float
    frame: Frame
    direction: FrameDirection


class FrameRecorder(FrameProcessor):
    """Passes every frame on and keeps it with its arrival time."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.arrivals: list[Arrival] = []
        self._changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.arrivals.append(Arrival(time.monotonic(), frame, direction))
        self._changed.set()
        await self.push_frame(frame, direction)

    def frames(self, kind: type[Frame], direction: FrameDirection | None = None) -> list[Arrival]:
        return [a for a in self.arrivals if isinstance(a.frame, kind) and direction in (None, a.direction)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.05))
            except TimeoutError:
                pass
        return True


class TTSProbe:
    """A running pipeline ``[upstream recorder, tts, sink recorder]``: frames in, arrivals out.

    ``async with TTSProbe(tts) as probe: await probe.send(TTSSpeakFrame("Hi."))``; the sink
    recorder stands where the output transport would be. ErrorFrames travel upstream and are
    seen by ``probe.upstream``.
    """

    def __init__(self, tts: ChatterboxTTSService, *, audio_out_sample_rate: int = 24000):
        self.tts = tts
        self.upstream = FrameRecorder(name="upstream-recorder")
        self.sink = FrameRecorder(name="sink-recorder")
        self._worker = PipelineWorker(
            Pipeline([self.upstream, tts, self.sink]),
            params=PipelineParams(audio_out_sample_rate=audio_out_sample_rate),
            cancel_on_idle_timeout=False,
            idle_timeout_secs=None,
            enable_rtvi=False,
            enable_turn_tracking=False,
        )
        self._runner_task: asyncio.Task | None = None

    async def __aenter__(self) -> TTSProbe:
        started = asyncio.Event()

        @self._worker.event_handler("on_pipeline_started")
        async def _on_started(_worker, _frame):
            started.set()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self._worker)
        self._runner_task = asyncio.create_task(runner.run())
        await asyncio.wait_for(started.wait(), timeout=10.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner_task is not None
        await self._worker.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(asyncio.shield(self._runner_task), timeout=15.0)
        except TimeoutError:
            await self._worker.cancel(reason="probe shutdown timed out")
            await self._runner_task

    async def send(self, frame: Frame) -> float:
        """Queue a frame at the pipeline's start; returns when it was queued."""
        at = time.monotonic()
        await self._worker.queue_frame(frame)
        return at

    def audio(self, context_id: str | None = None) -> list[Arrival]:
        return [
            a for a in self.sink.frames(TTSAudioRawFrame)
            if context_id is None or a.frame.context_id == context_id
        ]

    def errors(self) -> list[ErrorFrame]:
        return [a.frame for a in self.upstream.frames(ErrorFrame)]


def open_tcp_connections(url: str) -> int | None:
    """Sockets this process holds connected to the host and port of ``url`` (Linux /proc)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        count = 0
        for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and cols[9] in inodes and cols[3] != "0A":  # 0A = LISTEN
                        count += 1
        return count
    except OSError:
        return None


@dataclass
class SmokeResult:
    """Outcome of :func:`run_smoke_test`; times in seconds."""

    passed: bool
    reason: str
    first_audio_s: float | None = None  # request queued -> first audio at the sink
    audio_before_cancel_s: float = 0.0  # seconds of audio received before the cancel
    audio_frames_after_cancel: int = 0  # frames of the cancelled utterance after the cancel
    cancel_to_silence_s: float | None = None  # cancel -> last audio (or the interruption) at the sink
    cancel_to_release_s: float | None = None  # cancel -> this process holds no connection to it
    connections_during: int | None = None
    connections_after: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


async def run_smoke_test(
    url: str,
    voice: str = "default",
    *,
    cancel_after_s: float = 0.5,
    text: str = LONG_TEXT,
    first_byte_timeout_s: float = 10.0,
    settle_s: float = 1.0,
) -> SmokeResult:
    """Start a long synthesis, cancel it ``cancel_after_s`` after the first audio, check it stops."""
    tts = ChatterboxTTSService(base_url=url, voice=voice, first_byte_timeout_s=first_byte_timeout_s)
    async with TTSProbe(tts) as probe:
        if not await tts.check_health():
            return SmokeResult(False, f"the Chatterbox server at {url} is not reachable")
        sent_at = await probe.send(TTSSpeakFrame(text))
        if not await probe.sink.wait_for(lambda: probe.audio() or probe.errors(), first_byte_timeout_s + 5):
            return SmokeResult(False, f"no audio within {first_byte_timeout_s + 5:g} s")
        if not probe.audio():
            return SmokeResult(False, f"the server failed: {probe.errors()[0].error}")
        first = probe.audio()[0]
        await asyncio.sleep(max(0.0, first.at + cancel_after_s - time.monotonic()))
        return await _cancel_and_check(probe, url, sent_at, first, settle_s)


async def _cancel_and_check(probe: TTSProbe, url: str, sent_at: float, first: Arrival,
                            settle_s: float) -> SmokeResult:
    context_id = first.frame.context_id
    if probe.tts.requests_in_flight == 0:
        return SmokeResult(False, "the synthesis finished before the cancel; use a longer text",
                           first_audio_s=first.at - sent_at)
    during = open_tcp_connections(url)
    received = sum(len(a.frame.audio) for a in probe.audio(context_id)) / (2 * probe.tts.sample_rate)
    cancel_at = await probe.send(InterruptionFrame())
    await probe.sink.wait_for(lambda: bool(probe.sink.frames(InterruptionFrame)), settle_s)
    released_at = None
    deadline = cancel_at + settle_s
    while time.monotonic() < deadline:
        now_open = open_tcp_connections(url)
        if released_at is None and during is not None and now_open is not None and now_open < during:
            released_at = time.monotonic()
        await asyncio.sleep(0.005)
    after = open_tcp_connections(url)
    interruption = probe.sink.frames(InterruptionFrame)
    late = [a for a in probe.audio(context_id) if interruption and a.at > interruption[0].at]
    ends = [a.at for a in late] + [interruption[0].at if interruption else deadline]
    result = SmokeResult(
        passed=False,
        reason="",
        first_audio_s=first.at - sent_at,
        audio_before_cancel_s=received,
        audio_frames_after_cancel=len(late),
        cancel_to_silence_s=max(ends) - cancel_at,
        cancel_to_release_s=None if released_at is None else released_at - cancel_at,
        connections_during=during,
        connections_after=after,
    )
    if late:
        result.reason = f"{len(late)} audio frame(s) of the cancelled utterance came out after the cancel"
    elif during is None:
        result.reason = "cannot count connections on this system (/proc missing)"
    elif released_at is None:
        result.reason = f"the connection was still open {settle_s:g} s after the cancel"
    else:
        result.passed = True
        result.reason = "output stopped and the connection was released"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chatterbox cancel smoke test (a preflight gate).")
    parser.add_argument("--url", required=True, help="Chatterbox server, e.g. http://127.0.0.1:4123")
    parser.add_argument("--voice", default="default")
    parser.add_argument("--cancel-after", type=float, default=0.5, help="seconds after the first audio")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    result = asyncio.run(run_smoke_test(args.url, args.voice, cancel_after_s=args.cancel_after))
    print(result.to_json())
    print(("PASS: " if result.passed else "FAIL: ") + result.reason)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())

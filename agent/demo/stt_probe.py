"""Transcribe one WAV through an STT service the way a call does: VAD start, 20 ms audio frames,
VAD stop, then wait for the final transcript. Used by the preflight's ``stt`` gate.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import tempfile
from pathlib import Path

from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner


def write_speech_wav(text: str, path: Path, sample_rate: int = 16000) -> None:
    """``text`` spoken by espeak-ng, as a 16-bit mono WAV at ``sample_rate`` (resampled by sox)."""
    with tempfile.TemporaryDirectory(prefix="annie-say-") as tmp:
        raw = Path(tmp) / "espeak.wav"
        for cmd in (
            ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text],
            ["sox", str(raw), "-r", str(sample_rate), "-c", "1", "-b", "16", str(path)],
        ):
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed: {result.stderr.strip()}")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_overlap(expected: str, heard: str) -> float:
    """Fraction of the expected words present in what was heard (order-free)."""
    want, got = words(expected), set(words(heard))
    return sum(w in got for w in want) / len(want) if want else 0.0


class _Collector(FrameProcessor):
    """Passes frames on; keeps transcripts (downstream) or errors (upstream)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.transcripts: list[str] = []
        self.errors: list[str] = []
        self.final = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            self.transcripts.append(frame.text)
            if frame.finalized:
                self.final.set()
        elif isinstance(frame, ErrorFrame):
            self.errors.append(frame.error)
            self.final.set()
        await self.push_frame(frame, direction)


async def transcribe_wav(
    stt: FrameProcessor, pcm: bytes, sample_rate: int, *, timeout_s: float = 60.0
) -> tuple[str, list[str]]:
    """Run one utterance of 16-bit mono ``pcm`` through ``stt``; return (text, error messages)."""
    upstream, downstream = _Collector(name="probe-up"), _Collector(name="probe-down")
    worker = PipelineWorker(
        Pipeline([upstream, stt, downstream]),
        params=PipelineParams(audio_in_sample_rate=sample_rate),
        cancel_on_idle_timeout=False,
        idle_timeout_secs=None,
        enable_rtvi=False,
        enable_turn_tracking=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker, _frame):
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run_task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(started.wait(), 30)
        await worker.queue_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
        chunk = sample_rate // 50 * 2  # 20 ms
        for i in range(0, len(pcm), chunk):
            await worker.queue_frame(InputAudioRawFrame(pcm[i : i + chunk], sample_rate, 1))
            await asyncio.sleep(0)
        await worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        done = [asyncio.create_task(c.final.wait()) for c in (upstream, downstream)]
        _, pending = await asyncio.wait(done, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        errors = upstream.errors + downstream.errors
        if not downstream.transcripts and not errors:
            errors.append(f"no transcript within {timeout_s:g} s of the end of the utterance")
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(asyncio.shield(run_task), 30)
    except BaseException:
        await worker.cancel(reason="stt probe aborted")
        await run_task
        raise
    return " ".join(t.strip() for t in downstream.transcripts).strip(), errors

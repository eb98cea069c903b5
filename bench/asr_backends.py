"""The STT backends as the ASR bench drives them: one utterance in, the final text and its timings out.

- :class:`StreamingNemotron`: the in-process engine, fed chunk-sized pieces of audio (one
  ``accept`` a chunk, as the agent's worker steps it), then ``finalize`` after the last piece.
  ``realtime=True`` hands each piece over when its audio would have arrived on a call.
- :class:`Segmented`: a Pipecat segmented STT service (Whisper in process, the Parakeet HTTP
  sidecar) given the whole utterance after its last audio, as the agent gives it the VAD's
  segment; its ``run_stt`` is what the agent runs.

Time to final is wall time from the moment the last audio has been handed over to the moment
the final text is back: for the engine ``finalize``, for a segmented service the whole
transcription. The VAD's stop wait (the same for every backend) comes on top in a call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from bench.asr_manifest import SAMPLE_RATE


@dataclass
class Heard:
    """One utterance through one backend."""

    text: str
    final_ms: float  # last audio handed over -> final text
    compute_ms: float  # all wall time inside the backend for this utterance
    partial_right_ms: float | None = None  # streaming: when the partial first had the final's words, from the end of speech (< 0: before)
    partials: int = 0  # streaming: how many times the partial changed
    error: str | None = None  # the backend failed on this utterance (its text is then empty)


class Backend(Protocol):
    name: str
    kind: str  # "nemotron", "whisper" or "parakeet"
    chunk_ms: int | None

    def transcribe(self, audio: np.ndarray) -> Heard: ...

    def close(self) -> None: ...


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


@dataclass
class StreamingNemotron:
    """The streaming engine at one chunk size; ``norm`` decides when a partial "has the final's words"."""

    engine: object  # processors.nemotron.engine.NemotronStreamingEngine
    norm: Callable[[str], str]
    realtime: bool = False
    kind: str = "nemotron"
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.chunk_ms = self.engine.chunk_ms
        self.name = f"nemotron {self.chunk_ms} ms"

    def transcribe(self, audio: np.ndarray) -> Heard:
        engine, pcm = self.engine, to_pcm16(audio)
        step = SAMPLE_RATE * self.chunk_ms // 1000
        stream = engine.new_stream(SAMPLE_RATE)
        changes: list[tuple[float, str]] = []  # (seconds after the start of the audio the partial was out, text)
        compute = 0.0
        started = time.perf_counter()
        for start in range(0, pcm.size, step):
            piece = pcm[start : start + step]
            arrived = (start + piece.size) / SAMPLE_RATE
            if self.realtime:
                time.sleep(max(0.0, started + arrived - time.perf_counter()))
            t0 = time.perf_counter()
            text = engine.accept(stream, piece)
            spent = time.perf_counter() - t0
            compute += spent
            if text is not None:
                changes.append((arrived + spent, text))
        t0 = time.perf_counter()
        final = engine.finalize(stream)
        final_s = time.perf_counter() - t0
        right = first_right(changes, final, self.norm)
        return Heard(
            text=final,
            final_ms=1e3 * final_s,
            compute_ms=1e3 * (compute + final_s),
            partial_right_ms=None if right is None else 1e3 * (right - pcm.size / SAMPLE_RATE),
            partials=len(changes),
        )

    def close(self) -> None:
        self.engine.close()


def first_right(changes: list[tuple[float, str]], final: str, norm: Callable[[str], str]) -> float | None:
    """When the partial first had the final's (normalised) words: the time of that change, or None."""
    target = norm(final)
    return next((at for at, text in changes if target and norm(text) == target), None)


class Segmented:
    """A Pipecat ``SegmentedSTTService`` on its own event loop (kept for the aiohttp session)."""

    def __init__(self, name: str, kind: str, make_service: Callable[[object | None], object], *, http: bool = False):
        """``make_service(session)``: the service; ``session`` is an aiohttp session on this
        loop where ``http`` is set, else None."""
        self.name, self.kind, self.chunk_ms = name, kind, None
        self._loop = asyncio.new_event_loop()
        self._session = self._loop.run_until_complete(_open_session()) if http else None
        self._service = make_service(self._session)

    def transcribe(self, audio: np.ndarray) -> Heard:
        from pipecat.audio.utils import pcm_to_wav
        from pipecat.frames.frames import ErrorFrame, TranscriptionFrame

        pcm = to_pcm16(audio).tobytes()
        payload = pcm_to_wav(pcm, SAMPLE_RATE) if self._service.wants_wav_segments else pcm

        async def run():
            return [frame async for frame in self._service.run_stt(payload)]

        t0 = time.perf_counter()
        frames = self._loop.run_until_complete(run())
        spent = 1e3 * (time.perf_counter() - t0)
        text = " ".join(f.text.strip() for f in frames if isinstance(f, TranscriptionFrame)).strip()
        errors = [f.error for f in frames if isinstance(f, ErrorFrame)]
        return Heard(text=text, final_ms=spent, compute_ms=spent, error="; ".join(errors) or None)

    def close(self) -> None:
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
        self._loop.close()


def load_nemotron(nemo: Path, chunk_ms: int, device: str, precision: str, norm, realtime: bool) -> StreamingNemotron:
    import logging

    from nemo.utils import logging as nemo_logging

    from processors.nemotron.engine import NemotronStreamingEngine

    nemo_logging.setLevel(logging.ERROR)  # its INFO lines would bury the bench's

    return StreamingNemotron(NemotronStreamingEngine.load(nemo, chunk_ms, device, precision=precision), norm, realtime)


def load_whisper(model_path: Path | None, device: str) -> Segmented:
    """The agent's Whisper service (``make_whisper_stt``); ``None``: the bundled tiny.en."""
    from processors.whisper_stt import make_whisper_stt

    label = "whisper tiny.en" if model_path is None else f"whisper {Path(model_path).name}"
    return Segmented(label, "whisper", lambda _session: make_whisper_stt(model_path, device=device))


def load_parakeet(url: str, token: str | None, request_format: str) -> Segmented:
    """The agent's Parakeet sidecar client, on ``PARAKEET_URL``."""
    from processors.parakeet_stt import ParakeetHTTPSTTService

    return Segmented("parakeet sidecar", "parakeet", lambda session: ParakeetHTTPSTTService(
        url=url, token=token, request_format=request_format, session=session), http=True)


async def _open_session():
    import aiohttp

    return aiohttp.ClientSession()

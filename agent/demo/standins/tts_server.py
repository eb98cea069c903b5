"""A Chatterbox-compatible speech server on 127.0.0.1 for tests, benchmarks and the simulated call.

It speaks the wire protocol of the common self-hosted Chatterbox servers (travisvn
chatterbox-tts-api): ``POST /v1/audio/speech`` answers a whole WAV file, and
``POST /v1/audio/speech/stream`` answers a WAV header followed by 16-bit mono PCM at 24 kHz,
sentence by sentence, either under one header (``headers="per_request"``, data size left open
as the real server does) or with a complete WAV per sentence (``headers="per_sentence"``).
``GET /health`` and ``GET /ping`` answer too.

The audio is real speech: espeak-ng reads the requested text, resampled to 24 kHz mono. Without
espeak-ng the server falls back to tones (one per word). Audio goes out in chunks paced like a
GPU synthesizing faster than real time (:class:`TTSStandInOptions`).

Like the real servers it keeps "generating" after the client disconnects, but it records the
disconnect: every request gets a :class:`SpeechRequestRecord` with its start time, when the first
and last bytes went out, how many bytes, when the client went away and whether it completed.

Fault modes (``server.fault`` for every request, ``server.fault_once(...)`` for the next ones):
``http_<status>`` (e.g. ``http_500``, ``http_400``), ``hang`` (nothing before the client gives
up), ``odd_length`` (a stray byte after the audio), ``garbage`` (no WAV header, odd-length noise),
``bad_header`` (a WAV header announcing 8-bit stereo float nonsense), ``drop`` (connection closed
mid-stream).

Run standalone with ``python -m agent.demo.standins.tts_server --port 4123``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import soxr
from aiohttp import web
from loguru import logger

from agent.demo.standins._serve import serve

SAMPLE_RATE = 24000
STREAM_DATA_SIZE = 0xFFFFFFFF  # "unknown length", as streaming servers write it
Headers = Literal["per_request", "per_sentence"]
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


@dataclass
class SpeechRequestRecord:
    """What the server saw of one speech request."""

    path: str
    body: dict
    started_at: float
    fault: str = "none"
    status: int = 200
    first_byte_at: float | None = None
    last_byte_at: float | None = None
    bytes_sent: int = 0
    audio_bytes_total: int = 0
    disconnected_at: float | None = None
    generation_done_at: float | None = None
    finished_at: float | None = None

    @property
    def completed(self) -> bool:
        """Whether every byte of the answer went out and the client stayed to the end."""
        return self.finished_at is not None and self.disconnected_at is None


@dataclass
class TTSStandInOptions:
    """Timing and framing of the stand-in's answers."""

    first_byte_delay_s: float = 0.05  # model warm-up before the first audio chunk
    chunk_ms: int = 40  # audio per network write
    realtime_factor: float = 5.0  # seconds of audio generated per second of wall time
    sentence_delay_s: float = 0.02  # extra start-up time for every later sentence
    headers: Headers = "per_request"
    header_early: bool = False  # send the WAV header at once, before the first audio
    hang_s: float = 30.0  # how long a "hang" fault keeps the client waiting
    drop_after_bytes: int = 9600  # when a "drop" fault closes the connection


@functools.lru_cache(maxsize=256)
def synthesize(text: str) -> bytes:
    """Speech for ``text`` as 16-bit mono PCM at 24 kHz (espeak-ng, or tones without it)."""
    if shutil.which("espeak-ng"):
        out = subprocess.run(
            ["espeak-ng", "--stdout", "-s", "170", text], capture_output=True, check=True, timeout=30
        ).stdout
        rate, pcm = _wav_payload(out)
        samples = np.frombuffer(pcm, dtype=np.int16)
        return soxr.resample(samples, rate, SAMPLE_RATE).astype(np.int16).tobytes()
    return _tones(text)


def _wav_payload(data: bytes) -> tuple[int, bytes]:
    """Sample rate and PCM of a WAV file whose data size may be a streaming placeholder."""
    rate = struct.unpack_from("<I", data, 24)[0]
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk_id == b"data":
            pcm = data[pos + 8 :]
            return rate, pcm[: len(pcm) & ~1]
        pos += 8 + size
    raise ValueError("espeak-ng output has no data chunk")


def _tones(text: str) -> bytes:
    words = text.split() or ["."]
    t = np.arange(int(0.18 * SAMPLE_RATE)) / SAMPLE_RATE
    parts = []
    for i, _word in enumerate(words):
        tone = 0.3 * np.sin(2 * np.pi * (180 + 40 * (i % 5)) * t)
        parts += [tone, np.zeros(int(0.05 * SAMPLE_RATE))]
    return (np.concatenate(parts) * 32767).astype(np.int16).tobytes()


def wav_header(data_size: int = STREAM_DATA_SIZE, rate: int = SAMPLE_RATE, bits: int = 16,
               channels: int = 1, audio_format: int = 1) -> bytes:
    """A canonical 44-byte WAV header."""
    riff_size = 0x7FFFFFFF - 36 if data_size == STREAM_DATA_SIZE else 36 + data_size
    block = channels * bits // 8
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, audio_format, channels, rate, rate * block, block, bits)
        + b"data" + struct.pack("<I", data_size)
    )


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s] or [text]


@dataclass
class TTSStandIn:
    """The stand-in server; use ``async with TTSStandIn() as server: server.url``."""

    options: TTSStandInOptions = field(default_factory=TTSStandInOptions)
    host: str = "127.0.0.1"
    port: int = 0
    fault: str = "none"
    requests: list[SpeechRequestRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._fault_once: deque[str] = deque()
        self._generators: set[asyncio.Task] = set()
        self._changed = asyncio.Event()

    # -- control ---------------------------------------------------------------------------

    def fault_once(self, *faults: str) -> None:
        """Apply these faults to the next requests, one each, before ``fault`` again."""
        self._fault_once.extend(faults)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def open_connections(self) -> int:
        """TCP connections the server holds open right now (keep-alive ones included)."""
        server = self._runner.server if self._runner else None
        return len(server.connections) if server else 0

    def generation_tasks(self) -> set[asyncio.Task]:
        """The tasks still "synthesizing" (they go on after a client disconnects)."""
        return set(self._generators)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (re-checked whenever a request record changes)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), 0.05)
                except TimeoutError:
                    pass

    async def start(self) -> TTSStandIn:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        # The stand-in's own endpoints, for a server in a child process (times: time.monotonic()).
        app.router.add_get("/_stats", self._stats)
        app.router.add_get("/_requests", self._records)
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_post("/v1/audio/speech/stream", self._speech)
        # handler_cancellation: the handler is cancelled the moment the client goes away, which
        # is when the disconnect is recorded (generation itself goes on, as on the real server).
        self._runner, self.port = await serve(app, self.host, self.port, handler_cancellation=True)
        logger.debug(f"TTS stand-in listening on {self.url}")
        return self

    async def stop(self) -> None:
        for task in list(self._generators):
            task.cancel()
        await asyncio.gather(*self._generators, return_exceptions=True)
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TTSStandIn:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers --------------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "model_loaded": True})

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "requests": len(self.requests),
            "disconnected": sum(r.disconnected_at is not None for r in self.requests),
            "completed": sum(r.completed for r in self.requests),
            "open_connections": self.open_connections() - 1,  # not counting this one
        })

    async def _records(self, _request: web.Request) -> web.Response:
        keep = ("path", "started_at", "status", "first_byte_at", "last_byte_at", "bytes_sent",
                "disconnected_at", "generation_done_at", "finished_at")
        return web.json_response([{k: getattr(r, k) for k in keep} for r in self.requests])

    def _next_fault(self) -> str:
        return self._fault_once.popleft() if self._fault_once else self.fault

    def _notify(self) -> None:
        self._changed.set()

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        record = SpeechRequestRecord(request.path, body, time.monotonic(), fault=self._next_fault())
        self.requests.append(record)
        self._notify()
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            record.status = 422
            return web.json_response({"error": {"message": "input is required"}}, status=422)
        logger.trace(f"TTS stand-in request {record.path}: {text!r}")
        if record.fault.startswith("http_"):
            record.status = int(record.fault.removeprefix("http_"))
            record.finished_at = time.monotonic()
            return web.json_response({"error": {"message": f"fault {record.fault}"}}, status=record.status)
        try:
            if record.fault == "hang":
                await asyncio.sleep(self.options.hang_s)
                raise web.HTTPServiceUnavailable()
            return await self._stream(request, record, split_sentences(text.strip()))
        except asyncio.CancelledError:
            self._mark_disconnected(record)  # aiohttp saw the connection go
            raise
        except ConnectionResetError:
            self._mark_disconnected(record)  # a write found the connection closing first
            return web.Response(status=499)  # never sent: there is nobody to send it to

    def _mark_disconnected(self, record: SpeechRequestRecord) -> None:
        record.disconnected_at = record.disconnected_at or time.monotonic()
        self._notify()

    async def _stream(self, request: web.Request, record: SpeechRequestRecord,
                      sentences: list[str]) -> web.StreamResponse:
        whole_file = not request.path.endswith("/stream")
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        generator = asyncio.create_task(self._generate(sentences, record, queue, whole_file))
        self._generators.add(generator)
        generator.add_done_callback(self._generators.discard)
        response = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        await response.prepare(request)
        if self.options.header_early and not whole_file and self.options.headers == "per_request":
            await self._write(response, record, self._stream_header(record))
        while (piece := await queue.get()) is not None:
            if record.fault == "drop" and record.bytes_sent >= self.options.drop_after_bytes:
                record.disconnected_at = record.finished_at = time.monotonic()
                request.transport.close()  # type: ignore[union-attr]
                self._notify()
                return response
            await self._write(response, record, piece)
        if record.fault in ("odd_length", "garbage"):
            await self._write(response, record, b"\x01")
        await response.write_eof()
        record.finished_at = time.monotonic()
        self._notify()
        return response

    async def _write(self, response: web.StreamResponse, record: SpeechRequestRecord, data: bytes) -> None:
        await response.write(data)
        now = time.monotonic()
        record.first_byte_at = record.first_byte_at or now
        record.last_byte_at = now
        record.bytes_sent += len(data)
        self._notify()

    def _stream_header(self, record: SpeechRequestRecord) -> bytes:
        if record.fault == "garbage":
            return b""
        if record.fault == "bad_header":
            return wav_header(rate=SAMPLE_RATE, bits=8, channels=2, audio_format=3)
        return wav_header()

    async def _generate(self, sentences: list[str], record: SpeechRequestRecord,
                        queue: asyncio.Queue[bytes | None], whole_file: bool) -> None:
        """Produce the answer's bytes at the pace of a GPU, whether or not anyone still listens."""
        opts = self.options
        chunk = SAMPLE_RATE * 2 * opts.chunk_ms // 1000
        audio = [synthesize(s) for s in sentences]
        if record.fault == "garbage":
            audio = [np.random.default_rng(len(a)).bytes(len(a)) for a in audio]
        record.audio_bytes_total = sum(len(a) for a in audio)
        await asyncio.sleep(opts.first_byte_delay_s)
        if whole_file:
            # A whole-file server answers once the last sentence is done.
            total_s = record.audio_bytes_total / (2 * SAMPLE_RATE) / opts.realtime_factor
            await asyncio.sleep(total_s + opts.sentence_delay_s * (len(audio) - 1))
            header = self._stream_header(record) if record.fault in ("garbage", "bad_header") \
                else wav_header(record.audio_bytes_total)
            pcm = header + b"".join(audio)
            for start in range(0, len(pcm), 8192):
                queue.put_nowait(pcm[start : start + 8192])
        else:
            header_due = not opts.header_early and opts.headers == "per_request"
            for index, pcm in enumerate(audio):
                if index:
                    await asyncio.sleep(opts.sentence_delay_s)
                prefix = b""
                if opts.headers == "per_sentence":
                    prefix = self._stream_header(record) if record.fault in ("garbage", "bad_header") \
                        else wav_header(len(pcm))
                elif header_due:
                    prefix, header_due = self._stream_header(record), False
                for start in range(0, len(pcm), chunk):
                    piece = pcm[start : start + chunk]
                    if record.disconnected_at is None:  # nobody listens any more: drop it
                        queue.put_nowait(prefix + piece)
                    prefix = b""
                    await asyncio.sleep(len(piece) / (2 * SAMPLE_RATE) / opts.realtime_factor)
        queue.put_nowait(None)
        record.generation_done_at = time.monotonic()
        self._notify()


class TTSStandInProcess:
    """The stand-in in a child process (``with TTSStandInProcess() as server: server.url``).

    Keeps the server's work and memory out of the process under test; ``stats()`` reads its
    request counters over HTTP.
    """

    def __init__(self, *, first_byte_delay_s: float = 0.05, realtime_factor: float = 5.0,
                 headers: Headers = "per_request"):
        self._args = ["--port", "0", "--first-byte-delay", str(first_byte_delay_s),
                      "--realtime-factor", str(realtime_factor), "--headers", headers]
        self._process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> TTSStandInProcess:
        import sys

        self._process = subprocess.Popen(
            [sys.executable, "-m", "agent.demo.standins.tts_server", *self._args],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[3],
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        match = re.search(r"http://\S+", line)
        if not match:
            self.__exit__()
            raise RuntimeError(f"the TTS stand-in did not start: {line!r}")
        self.url = match.group(0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def stats(self) -> dict:
        """Request counters: requests, disconnected, completed, open_connections."""
        return self._get("/_stats")

    def records(self) -> list[dict]:
        """Every request's record (see :class:`SpeechRequestRecord`) as a dict."""
        return self._get("/_requests")

    def _get(self, path: str):
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
            return json.load(response)


async def _serve(host: str, port: int, options: TTSStandInOptions) -> None:
    async with TTSStandIn(options=options, host=host, port=port) as server:
        print(f"TTS stand-in on {server.url} (Ctrl-C to stop)", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Chatterbox-compatible TTS stand-in on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=4123, help="0 picks a free port")
    parser.add_argument("--first-byte-delay", type=float, default=0.05, help="seconds")
    parser.add_argument("--realtime-factor", type=float, default=5.0)
    parser.add_argument("--headers", choices=["per_request", "per_sentence"], default="per_request")
    args = parser.parse_args()
    options = TTSStandInOptions(first_byte_delay_s=args.first_byte_delay,
                                realtime_factor=args.realtime_factor, headers=args.headers)
    try:
        asyncio.run(_serve("127.0.0.1", args.port, options))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

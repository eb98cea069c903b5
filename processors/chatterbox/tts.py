"""ChatterboxTTSService: speech from a self-hosted Chatterbox server over HTTP, cut off on barge-in.

The server speaks the OpenAI-compatible API of the common Chatterbox servers:
``POST /v1/audio/speech`` (a whole WAV) or, with ``streaming=True``,
``POST /v1/audio/speech/stream`` (a WAV header, then 16-bit mono PCM at 24 kHz, sentence by
sentence; one header per answer or one per sentence). Each sentence the base class aggregates is
one request; its audio is pushed the moment the first whole samples arrive, resampled to the
pipeline's output rate.

Interruptions: pipecat cancels the task running :meth:`run_tts` at its pending network read, and
leaving the ``async with`` closes the response; an unfinished body makes httpx drop that
connection, so the server sees the client go away. Every utterance is also tagged with its
context id: once that context is interrupted, nothing more of it is yielded, whatever task drives
the generator. The next utterance opens a fresh connection or a clean keep-alive one.

A sentence synthesized ahead (:class:`processors.prefetch.TTSPrefetchFrame`, sent by the LLM
service while preemptive generation holds an answer) starts its request at once and buffers the
audio; nothing of it is pushed until :meth:`run_tts` is asked for the same sentence, which then
plays from the buffer. A withdrawal (``EagerEndOfTurnCancelFrame``), an interruption, a newer
prefetch or ``prefetch_ttl_s`` without use drops it and closes its request.

Errors never escape :meth:`run_tts`: connection refused, timeouts (no audio within
``first_byte_timeout_s`` included) and 5xx are retried once when no audio has been played yet,
then become a non-fatal ``ErrorFrame`` (logged); 4xx are not retried; audio that is not 16-bit
mono PCM WAV is dropped with a warning.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from loguru import logger
from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler
from pipecat.frames.frames import (
    CancelFrame,
    EagerEndOfTurnCancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.types import NOT_GIVEN, NotGiven

from processors.chatterbox.wav import PcmChunk, WavFormatError, WavStreamParser
from processors.prefetch import TTSPrefetchFrame, sentence_key
from processors.retry import Retries, ServiceRequestError

SPEECH_PATH = "/v1/audio/speech"
STREAM_PATH = "/v1/audio/speech/stream"
HEALTH_PATH = "/health"
_ERROR_BODY_LIMIT = 2048


@dataclass
class ChatterboxTTSSettings(TTSSettings):
    """Runtime-updatable settings (``TTSUpdateSettingsFrame``): voice and exaggeration."""

    exaggeration: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class ChatterboxRequestError(ServiceRequestError):
    """One synthesis request failed; ``retryable`` says whether trying again may help."""


class ChatterboxTTSService(TTSService):
    """Pipecat TTS service for a Chatterbox server (see the module docstring)."""

    _settings: ChatterboxTTSSettings

    def __init__(
        self,
        *,
        base_url: str,
        voice: str,
        streaming: bool = True,
        exaggeration: float = 0.5,
        first_byte_timeout_s: float = 3.0,
        sample_rate: int | None = None,
        read_timeout_s: float = 10.0,
        max_retries: int = 1,
        retry_backoff_s: float = 0.2,
        prefetch_ttl_s: float = 10.0,
        extra_params: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Create the service; the HTTP client is opened in ``start``.

        Args:
            base_url: The server, e.g. ``http://127.0.0.1:4123`` (no ``/v1``).
            voice: Voice name the server knows (sent as ``voice``).
            streaming: Use ``/v1/audio/speech/stream`` instead of the whole-file endpoint.
            exaggeration: Chatterbox emotion intensity, sent as ``exaggeration``.
            first_byte_timeout_s: A request with no audio after this long is cut off.
            sample_rate: Output rate; default the pipeline's ``audio_out_sample_rate``.
            read_timeout_s: A stream that stalls this long after audio started is cut off.
            max_retries: Retries of a failed request before any audio played (5xx, timeouts,
                connection errors; never 4xx).
            retry_backoff_s: Pause before a retry.
            prefetch_ttl_s: A sentence synthesized ahead and not asked for within this long is
                dropped.
            extra_params: More JSON fields for every request (``cfg_weight``, ``temperature``).
            **kwargs: Passed to ``TTSService``.
        """
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"ChatterboxTTSService base_url must be an http(s) URL, got {base_url!r}")
        if first_byte_timeout_s <= 0 or read_timeout_s <= 0:
            raise ValueError("ChatterboxTTSService timeouts must be positive")
        if prefetch_ttl_s <= 0:
            raise ValueError("ChatterboxTTSService prefetch_ttl_s must be positive")
        if max_retries < 0:
            raise ValueError("ChatterboxTTSService max_retries must be 0 or more")
        kwargs.setdefault("push_start_frame", True)
        kwargs.setdefault("push_stop_frames", True)
        # A TTS server that is down for a while must not write the service off for the rest of
        # the call: every silent turn is still reported, and speech resumes when it comes back.
        kwargs.setdefault("max_consecutive_zero_audio_contexts", 0)
        super().__init__(
            sample_rate=sample_rate,
            settings=ChatterboxTTSSettings(
                model=None, voice=voice, language=None, exaggeration=exaggeration
            ),
            **kwargs,
        )
        self._base_url = base_url.rstrip("/")
        self._streaming = streaming
        self._first_byte_timeout_s = first_byte_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_retries = max_retries
        self._retry_backoff_s = retry_backoff_s
        self._extra_params = dict(extra_params or {})
        self._client: httpx.AsyncClient | None = None
        self._interrupted: deque[str] = deque(maxlen=64)
        self._in_flight: dict[str, httpx.Response | _Prefetch] = {}
        self._prefetch_ttl_s = prefetch_ttl_s
        self._prefetch: _Prefetch | None = None
        self.prefetches = {"started": 0, "played": 0, "dropped": 0}  # counts for logs and the bench

    # -- lifecycle -------------------------------------------------------------------------

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def requests_in_flight(self) -> int:
        """Synthesis requests whose answer is still being read."""
        return len(self._in_flight)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        self._open_client()
        await self.check_health()

    async def stop(self, frame: EndFrame) -> None:
        self._drop_prefetch("the call ended")
        await super().stop(frame)
        await self._close_client()

    async def cancel(self, frame: CancelFrame) -> None:
        self._drop_prefetch("the call ended")
        await super().cancel(frame)
        await self._close_client()

    async def cleanup(self) -> None:
        self._drop_prefetch("the call ended")
        await super().cleanup()
        await self._close_client()

    def _open_client(self) -> None:
        if self._client is not None:
            return
        self._client = httpx.AsyncClient(
            base_url=self._base_url,
            timeout=httpx.Timeout(
                connect=self._first_byte_timeout_s,
                read=self._read_timeout_s,
                write=self._first_byte_timeout_s,
                pool=self._first_byte_timeout_s,
            ),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=30.0),
            trust_env=False,  # a local server: never through an environment proxy
        )
        logger.debug(f"{self}: HTTP client for {self._base_url} opened")

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
            logger.debug(f"{self}: HTTP client closed")

    async def check_health(self) -> bool:
        """Ask the server whether it is up; log a warning (never raise) when it is not."""
        if self._client is None:
            logger.warning(f"{self}: health check skipped, the service is not started")
            return False
        try:
            response = await self._client.get(HEALTH_PATH, timeout=min(2.0, self._first_byte_timeout_s))
        except httpx.HTTPError as e:
            logger.warning(
                f"{self}: Chatterbox server at {self._base_url} is not reachable yet "
                f"({type(e).__name__}); speech will fail until it is up (check CHATTERBOX_URL)"
            )
            return False
        if response.status_code >= 500:
            logger.warning(f"{self}: Chatterbox server health check answered HTTP {response.status_code}")
            return False
        # Any other answer means something is listening; servers without /health answer 404.
        logger.debug(f"{self}: Chatterbox server at {self._base_url} is up")
        return True

    # -- frames --------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSPrefetchFrame):
            self._start_prefetch(frame.text)
        elif isinstance(frame, EagerEndOfTurnCancelFrame):
            self._drop_prefetch("the answer was withdrawn")
        elif isinstance(frame, InterruptionFrame):
            self._drop_prefetch("interrupted")

    # -- a sentence synthesized ahead ----------------------------------------------------------

    def _start_prefetch(self, text: str) -> None:
        self._drop_prefetch("a newer one replaced it")
        if self._client is None or not sentence_key(text):
            return
        prefetch = _Prefetch(sentence_key(text), expires=time.monotonic() + self._prefetch_ttl_s)
        prefetch.task = self.create_task(self._run_prefetch(prefetch, text), "tts_prefetch")
        self._prefetch = prefetch
        self.prefetches["started"] += 1
        logger.debug(f"{self}: synthesizing the held answer's first sentence ahead ({len(text)} chars)")

    def _drop_prefetch(self, why: str) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            prefetch.close()
            self.prefetches["dropped"] += 1
            logger.debug(f"{self}: sentence synthesized ahead dropped: {why}")

    def _take_prefetch(self, text: str) -> _Prefetch | None:
        """The prefetch of this very sentence, if one is alive; it is then this request's."""
        prefetch = self._prefetch
        if prefetch is None:
            return None
        if time.monotonic() > prefetch.expires:
            self._drop_prefetch(f"not asked for within {self._prefetch_ttl_s:g} s")
            return None
        if prefetch.key != sentence_key(text):
            return None  # another sentence (e.g. the end of an earlier answer): keep it for its own
        self._prefetch = None
        self.prefetches["played"] += 1
        return prefetch

    async def _run_prefetch(self, prefetch: _Prefetch, text: str) -> None:
        """Send the request and buffer what comes back; failures are kept for the reader."""
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(self._first_byte_timeout_s):
                response = await self._send(text)
            async for data in response.aiter_raw():
                prefetch.put(data)
            prefetch.put(None)
        except (TimeoutError, httpx.HTTPError, ChatterboxRequestError) as e:
            prefetch.put(self._request_error(e))
        finally:
            if response is not None:
                await response.aclose()

    # -- interruption ------------------------------------------------------------------------

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Tag the utterance as cancelled and close its request if it is still open."""
        self._interrupted.append(context_id)
        response = self._in_flight.pop(context_id, None)
        if response is not None:
            await response.aclose()
        await super().on_audio_context_interrupted(context_id)

    def _is_cancelled(self, context_id: str) -> bool:
        return context_id in self._interrupted

    # -- synthesis ---------------------------------------------------------------------------

    async def tts_process_generator(self, context_id: str, generator: AsyncGenerator[Frame | None, None]):
        """Route run_tts frames to the audio context (see ``TTSService``)."""
        await super().tts_process_generator(context_id, generator)
        # Everything this service produces is yielded inline, also when a request failed and
        # yielded no audio; telling the base so lets the turn's audio context close when the
        # turn ends, instead of holding the next utterance for stop_frame_timeout_s.
        self._is_yielding_frames_synchronously = True

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Synthesize one sentence; yield its audio frames, or one ``ErrorFrame``."""
        await self.start_tts_usage_metrics(text)
        retries = Retries(self, self._max_retries, self._retry_backoff_s)
        while True:
            played = False
            try:
                async for frame in self._synthesize(text, context_id):
                    played = True
                    yield frame
                return
            except ChatterboxRequestError as e:
                if self._is_cancelled(context_id):
                    return  # the request was closed on purpose
                if played or not await retries.again(e):
                    yield ErrorFrame(error=f"Chatterbox TTS failed: {e}", category=e.category)
                    return
            except WavFormatError as e:
                logger.warning(f"{self}: dropped a malformed answer from the Chatterbox server: {e}")
                return

    def _request_body(self, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input": text,
            "voice": self._settings.voice,
            "response_format": "wav",
            "exaggeration": self._settings.exaggeration,
        }
        body.update(self._extra_params)
        return {k: v for k, v in body.items() if v is not None}

    async def _synthesize(self, text: str, context_id: str) -> AsyncGenerator[TTSAudioRawFrame, None]:
        """One request: frames as soon as whole samples arrive; errors as ChatterboxRequestError."""
        if self._client is None:
            raise ChatterboxRequestError(
                "the service is not started", retryable=False, category=ErrorCategory.APPLICATION
            )
        decoder = _PcmDecoder(self.sample_rate)
        response: httpx.Response | None = None
        reads: AsyncGenerator[bytes, None] | None = None
        prefetch = self._take_prefetch(text)
        try:
            async with asyncio.timeout(self._first_byte_timeout_s):
                if prefetch is not None:
                    self._in_flight[context_id] = prefetch
                    reads = prefetch.reads()
                else:
                    response = await self._send(text)
                    self._in_flight[context_id] = response
                    reads = response.aiter_raw()
                first = await self._first_audio(reads, decoder)
            for audio in first:
                if self._is_cancelled(context_id):
                    return
                yield self._frame(audio, context_id)
            async for data in reads:
                if self._is_cancelled(context_id):
                    return
                for audio in await decoder.feed(data):
                    yield self._frame(audio, context_id)
            for audio in await decoder.finish():
                if self._is_cancelled(context_id):
                    return
                yield self._frame(audio, context_id)
        except (TimeoutError, httpx.HTTPError) as e:
            raise self._request_error(e) from e
        finally:
            self._in_flight.pop(context_id, None)
            if reads is not None:
                await reads.aclose()
            if response is not None:
                await response.aclose()
            for warning in decoder.take_warnings():
                logger.warning(f"{self}: malformed audio from the Chatterbox server: {warning}")

    def _request_error(self, error: Exception) -> ChatterboxRequestError:
        """A failed request as a ChatterboxRequestError (for the retry logic and the ErrorFrame)."""
        if isinstance(error, ChatterboxRequestError):
            return error
        if isinstance(error, TimeoutError):
            return ChatterboxRequestError(
                f"no audio within {self._first_byte_timeout_s:g} s", retryable=True, category=ErrorCategory.SERVER
            )
        assert isinstance(error, httpx.HTTPError)
        return _classify(error)

    async def _send(self, text: str) -> httpx.Response:
        assert self._client is not None
        path = STREAM_PATH if self._streaming else SPEECH_PATH
        request = self._client.build_request("POST", path, json=self._request_body(text))
        response = await self._client.send(request, stream=True)
        if response.status_code >= 400:
            detail = (await response.aread())[:_ERROR_BODY_LIMIT]
            await response.aclose()
            logger.trace(f"{self}: Chatterbox error body: {detail!r}")
            status = response.status_code
            raise ChatterboxRequestError(
                f"HTTP {status} {response.reason_phrase} from {path}",
                retryable=status >= 500,
                category=ErrorCategory.SERVER if status >= 500
                else ErrorCategory.RATE_LIMIT if status == 429 else ErrorCategory.APPLICATION,
            )
        return response

    async def _first_audio(self, reads: AsyncGenerator[bytes, None], decoder: _PcmDecoder) -> list[bytes]:
        """Read until the first whole samples arrive (the first-byte timeout runs meanwhile)."""
        async for data in reads:
            audio = await decoder.feed(data)
            if audio:
                return audio
        return await decoder.finish()

    def _frame(self, audio: bytes, context_id: str) -> TTSAudioRawFrame:
        return TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)


class _Prefetch:
    """One sentence's request started ahead: its raw answer, buffered until it is asked for."""

    def __init__(self, key: str, *, expires: float):
        self.key = key
        self.expires = expires
        self.task: asyncio.Task | None = None
        self._chunks: asyncio.Queue[bytes | ChatterboxRequestError | None] = asyncio.Queue()

    def put(self, item: bytes | ChatterboxRequestError | None) -> None:
        self._chunks.put_nowait(item)

    async def reads(self) -> AsyncGenerator[bytes, None]:
        """The answer's bytes as they came and come; its failure raised here, where it is read."""
        try:
            while (item := await self._chunks.get()) is not None:
                if isinstance(item, ChatterboxRequestError):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # leaving its ``async with`` closes the response

    async def aclose(self) -> None:
        self.close()


def _classify(error: httpx.HTTPError) -> ChatterboxRequestError:
    """A transport-level httpx error as a request error (all are worth one retry)."""
    if isinstance(error, httpx.ConnectError):
        what = "connection refused or unreachable"
    elif isinstance(error, httpx.TimeoutException):
        what = f"timed out ({type(error).__name__})"
    elif isinstance(error, httpx.RemoteProtocolError):
        what = "the server closed the connection mid-answer"
    else:
        what = f"{type(error).__name__}: {error}"
    return ChatterboxRequestError(what, retryable=True, category=ErrorCategory.CONNECTIVITY)


class _PcmDecoder:
    """WAV stream -> 16-bit PCM at the output rate, resampled per segment rate."""

    def __init__(self, out_rate: int):
        self._out_rate = out_rate
        self._parser = WavStreamParser()
        self._in_rate: int | None = None
        self._resampler: SOXRStreamAudioResampler | None = None

    async def feed(self, data: bytes) -> list[bytes]:
        return await self._convert(self._parser.feed(data), final=False)

    async def finish(self) -> list[bytes]:
        return await self._convert(self._parser.finish(), final=True)

    def take_warnings(self) -> list[str]:
        warnings, self._parser.warnings = self._parser.warnings, []
        return warnings

    async def _convert(self, chunks: list[PcmChunk], *, final: bool) -> list[bytes]:
        out: list[bytes] = []
        for chunk in chunks:
            if chunk.sample_rate != self._in_rate:
                out.append(await self._flush())
                self._in_rate = chunk.sample_rate
                if chunk.sample_rate != self._out_rate:
                    self._resampler = SOXRStreamAudioResampler(quality="HQ", clear_after_secs=None)
            if self._resampler is None:
                out.append(chunk.pcm)
            else:
                out.append(await self._resampler.resample(chunk.pcm, chunk.sample_rate, self._out_rate))
        if final:
            out.append(await self._flush())
        return [a for a in out if a]

    async def _flush(self) -> bytes:
        resampler, self._resampler = self._resampler, None
        return await resampler.flush() if resampler is not None else b""

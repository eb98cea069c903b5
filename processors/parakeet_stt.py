"""Revert path: whole utterances to the existing offline Parakeet sidecar over HTTP.

``STT_BACKEND=parakeet-http``. Silero VAD cuts the caller's speech into utterances; each one is
posted as a 16 kHz mono 16-bit WAV to ``PARAKEET_URL`` with the ``X-Internal-Token`` header, and
the answer's text becomes one finalized ``TranscriptionFrame``. This is today's half-duplex
behaviour, kept so the operator can switch back without a code change.

The wire format, in one place (:func:`build_request`) so it is easy to change:

- ``request_format="multipart"`` (default): ``POST PARAKEET_URL`` with a multipart/form-data body
  holding one file field ``file`` (``utterance.wav``, ``audio/wav``).
- ``request_format="raw"``: ``POST PARAKEET_URL`` with the WAV bytes as the body,
  ``Content-Type: audio/wav``.
- Either way the answer is JSON ``{"text": "..."}``; any other field is ignored.

``PARAKEET_URL`` is the complete endpoint URL (e.g. ``http://127.0.0.1:8001/transcribe``).

Failures never end the call: each becomes an ``ErrorFrame`` plus a log line. 5xx answers,
timeouts and refused connections are retried once; 4xx answers are not. 401/403/404 mean the
token or the URL is wrong for every utterance, so they are reported as permanent (pipecat then
stops sending this service work); other 4xx answers concern one utterance only.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Literal

import aiohttp
from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, TranscriptionFrame
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.time import time_now_iso8601

from processors.errors import SetupError
from processors.retry import Retries, ServiceRequestError
from processors.stt_in_flight import SegmentInFlight

RequestFormat = Literal["multipart", "raw"]
TOKEN_HEADER = "X-Internal-Token"
_PERMANENT_STATUS = {401: ErrorCategory.AUTHENTICATION, 403: ErrorCategory.AUTHORIZATION,
                     404: ErrorCategory.INVALID_REQUEST}


class SidecarError(ServiceRequestError):
    """One utterance could not be transcribed; ``retryable`` says whether retrying can help."""

    def __init__(self, message: str, category: ErrorCategory, *, retry: bool) -> None:
        super().__init__(message, retryable=retry, category=category)


def build_request(wav: bytes, request_format: RequestFormat) -> dict[str, Any]:
    """Keyword arguments for ``aiohttp.ClientSession.post`` carrying one WAV utterance."""
    if request_format == "raw":
        return {"data": wav, "headers": {"Content-Type": "audio/wav"}}
    form = aiohttp.FormData()
    form.add_field("file", wav, filename="utterance.wav", content_type="audio/wav")
    return {"data": form}


def parse_answer(body: Any) -> str:
    """The transcript in the sidecar's JSON answer; raises ``SidecarError`` if it has none."""
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise SidecarError("answer has no string field 'text'", ErrorCategory.UNKNOWN, retry=False)
    return text.strip()


class ParakeetHTTPSTTService(SegmentInFlight, SegmentedSTTService):
    """Posts each VAD-segmented utterance as WAV to the Parakeet sidecar; one final transcript each."""

    def __init__(
        self,
        *,
        url: str,
        token: str | None,
        request_format: RequestFormat = "multipart",
        timeout_s: float = 15.0,
        max_attempts: int = 2,
        retry_delay_s: float = 0.2,
        session: aiohttp.ClientSession | None = None,
        **kwargs,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise SetupError(f"PARAKEET_URL must be an http:// or https:// URL (got {url!r}).")
        if request_format not in ("multipart", "raw"):
            raise SetupError(f"Parakeet request format must be multipart or raw (got {request_format!r}).")
        super().__init__(
            settings=STTSettings(model="parakeet-sidecar", language=None),
            ttfs_p99_latency=1.0,
            **kwargs,
        )
        self._url = url
        self._token = token
        self._format: RequestFormat = request_format
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_attempts = max(1, max_attempts)
        self._retry_delay_s = retry_delay_s
        self._session = session
        self._owns_session = session is None

    def can_generate_metrics(self) -> bool:
        return True

    async def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def _close_session(self) -> None:
        session, owned = self._session, self._owns_session
        if owned and session is not None:
            self._session = None
            await session.close()

    async def stop(self, frame) -> None:
        await super().stop(frame)
        await self._close_session()

    async def cancel(self, frame) -> None:
        await super().cancel(frame)
        await self._close_session()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close_session()

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame, None]:
        """Transcribe one utterance (``audio`` is a WAV file, as SegmentedSTTService hands it)."""
        await self.start_processing_metrics()
        try:
            text = await self._transcribe_with_retry(audio)
        except SidecarError as e:
            # push_error_frame logs it at ERROR level; the call goes on.
            yield ErrorFrame(f"Parakeet sidecar gave up on an utterance: {e}", category=e.category)
            return
        finally:
            await self.stop_processing_metrics()
        if text:
            logger.trace(f"{self}: transcript: {text}")
            yield TranscriptionFrame(text, self._user_id, time_now_iso8601())

    async def _transcribe_with_retry(self, wav: bytes) -> str:
        retries = Retries(self, self._max_attempts - 1, self._retry_delay_s)
        while True:
            try:
                return await self._post(wav)
            except SidecarError as e:
                if not await retries.again(e):
                    raise

    async def _post(self, wav: bytes) -> str:
        session = await self._ensure_session()
        request = build_request(wav, self._format)
        headers = dict(request.pop("headers", {}))
        if self._token:
            headers[TOKEN_HEADER] = self._token
        try:
            async with session.post(self._url, headers=headers, timeout=self._timeout, **request) as resp:
                if resp.status >= 400:
                    raise _status_error(resp.status)
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError) as e:
                    raise SidecarError("answer is not JSON", ErrorCategory.UNKNOWN, retry=False) from e
                return parse_answer(body)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
            reason = "timed out" if isinstance(e, TimeoutError) else f"connection failed ({e})"
            raise SidecarError(f"{self._url} {reason}", ErrorCategory.CONNECTIVITY, retry=True) from e


def _status_error(status: int) -> SidecarError:
    if status in _PERMANENT_STATUS:
        hint = "check INTERNAL_TOKEN" if status in (401, 403) else "check PARAKEET_URL"
        return SidecarError(f"HTTP {status} ({hint})", _PERMANENT_STATUS[status], retry=False)
    if status >= 500:
        return SidecarError(f"HTTP {status}", ErrorCategory.SERVER, retry=True)
    return SidecarError(f"HTTP {status} for this utterance", ErrorCategory.UNKNOWN, retry=False)

"""The local status endpoint: what the agent is doing, for the operator, never what was said.

Three pieces, from plain to I/O:

- :class:`CallStatus` holds the state (idle / listening / speaking), the configuration the
  operator wants to see (barge-in mode, STT backend and chunk size, model loaded), the last
  turn's latency breakdown and counters. It does no I/O and holds no text of the conversation.
- :class:`StatusObserver` is a pipecat observer that updates a ``CallStatus`` from the frames
  flowing through the pipeline (speaking frames, interruptions, errors, metrics).
- :class:`StatusServer` serves it over HTTP on 127.0.0.1 (aiohttp):

  ``GET /v1/phone/status``  needs ``X-Internal-Token`` (compared in constant time); 401 without
  or with a wrong one, 503 when no token is configured (the endpoint is then closed).
  ``GET /health``           no token; 200 ``{"ok": true}`` once the pipeline runs with its model
  loaded, else 503 ``{"ok": false}``.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    LLMTextFrame,
    MetricsFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection

from processors.errors import SetupError

State = Literal["idle", "listening", "speaking"]
TOKEN_HEADER = "X-Internal-Token"
STATUS_PATH = "/v1/phone/status"
HEALTH_PATH = "/health"

_NS_PER_MS = 1_000_000


@dataclass
class TurnLatency:
    """Where the time of one user-to-bot turn went, in milliseconds (None: not observed).

    ``speech_end`` is the VAD stop minus the VAD's stop_secs, i.e. when the caller went quiet.
    """

    endpointing_ms: float | None = None  # speech end -> user turn declared over
    stt_ms: float | None = None  # speech end -> final transcript
    llm_ttfb_ms: float | None = None  # user turn over -> first LLM text
    tts_ttfb_ms: float | None = None  # first LLM text -> first TTS audio (incl. waiting for a sentence)
    transport_ms: float | None = None  # first TTS audio -> bot started speaking
    total_ms: float | None = None  # speech end -> bot started speaking
    service_ttfb_ms: dict[str, float] = field(default_factory=dict)  # from MetricsFrame TTFB

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpointing_ms": self.endpointing_ms,
            "stt_ms": self.stt_ms,
            "llm_ttfb_ms": self.llm_ttfb_ms,
            "tts_ttfb_ms": self.tts_ttfb_ms,
            "transport_ms": self.transport_ms,
            "total_ms": self.total_ms,
            "service_ttfb_ms": dict(self.service_ttfb_ms),
        }


@dataclass
class _TurnMoments:
    """Pipeline-clock times (ns) of the moments of the turn in progress."""

    speech_end: int | None = None
    transcript: int | None = None
    turn_end: int | None = None
    llm_first_text: int | None = None
    tts_first_audio: int | None = None
    service_ttfb_ms: dict[str, float] = field(default_factory=dict)


def _span_ms(start: int | None, end: int | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return round((end - start) / _NS_PER_MS, 1)


class CallStatus:
    """Plain state of the agent, as the status endpoint reports it. No I/O, no conversation text.

    The pipeline-independent parts (barge-in, STT backend, chunk size) come from the settings;
    ``model_loaded`` is set by whoever loads the model; the rest is updated by
    :class:`StatusObserver` through the ``on_*`` methods (timestamps are pipeline-clock ns).
    """

    def __init__(
        self,
        *,
        barge_in: bool,
        stt_backend: str,
        chunk_ms: int | None = None,
        model_loaded: bool = False,
        clock=time.monotonic,
    ) -> None:
        self.barge_in = barge_in
        self.stt_backend = stt_backend
        self.chunk_ms = chunk_ms
        self.model_loaded = model_loaded
        self.pipeline_running = False
        self.user_speaking = False
        self.bot_speaking = False
        self.turns = 0
        self.barge_ins = 0
        self.interruptions = 0
        self.errors = 0
        self.errors_by_category: dict[str, int] = {}
        self.last_turn: TurnLatency | None = None
        self._moments = _TurnMoments()
        self._clock = clock
        self.shadow: Any = None  # barge-in shadow mode's log (agent.bargein.shadow.ShadowLog), if on
        self._started_at = clock()

    @classmethod
    def from_settings(cls, settings: Any, *, model_loaded: bool = False) -> CallStatus:
        """Build from ``agent.config.AgentSettings`` (chunk size only for the streaming backend)."""
        chunk = settings.asr_chunk_ms if settings.stt_backend == "nemotron" else None
        return cls(
            barge_in=settings.enable_barge_in,
            stt_backend=settings.stt_backend,
            chunk_ms=chunk,
            model_loaded=model_loaded,
        )

    @property
    def state(self) -> State:
        if self.bot_speaking:
            return "speaking"
        if self.user_speaking:
            return "listening"
        return "idle"

    @property
    def healthy(self) -> bool:
        return self.pipeline_running and self.model_loaded

    # Updates (called by StatusObserver, or directly in tests).

    def on_pipeline_started(self) -> None:
        self.pipeline_running = True

    def on_pipeline_ended(self) -> None:
        self.pipeline_running = False
        self.user_speaking = False
        self.bot_speaking = False

    def on_user_started(self) -> None:
        self.user_speaking = True

    def on_user_stopped(self, t_ns: int) -> None:
        self.user_speaking = False
        self._moments.turn_end = t_ns

    def on_speech_end(self, t_ns: int) -> None:
        """The caller went quiet (VAD stop, corrected by its stop_secs): a new turn's clock."""
        self._moments = _TurnMoments(speech_end=t_ns)

    def on_transcript(self, t_ns: int) -> None:
        if self._moments.speech_end is not None:
            self._moments.transcript = t_ns

    def on_llm_text(self, t_ns: int) -> None:
        if self._moments.turn_end is not None and self._moments.llm_first_text is None:
            self._moments.llm_first_text = t_ns

    def on_tts_audio(self, t_ns: int) -> None:
        if self._moments.llm_first_text is not None and self._moments.tts_first_audio is None:
            self._moments.tts_first_audio = t_ns

    def on_service_ttfb(self, processor: str, seconds: float) -> None:
        if self._moments.speech_end is not None:
            self._moments.service_ttfb_ms[processor] = round(seconds * 1000, 1)

    def on_bot_started(self, t_ns: int) -> None:
        self.bot_speaking = True
        m = self._moments
        if m.speech_end is None:
            return  # a greeting, or a second start within the same turn
        self.last_turn = TurnLatency(
            endpointing_ms=_span_ms(m.speech_end, m.turn_end),
            stt_ms=_span_ms(m.speech_end, m.transcript),
            llm_ttfb_ms=_span_ms(m.turn_end, m.llm_first_text),
            tts_ttfb_ms=_span_ms(m.llm_first_text, m.tts_first_audio),
            transport_ms=_span_ms(m.tts_first_audio, t_ns),
            total_ms=_span_ms(m.speech_end, t_ns),
            service_ttfb_ms=dict(m.service_ttfb_ms),
        )
        self.turns += 1
        self._moments = _TurnMoments()

    def on_bot_stopped(self) -> None:
        self.bot_speaking = False

    def on_interruption(self) -> None:
        self.interruptions += 1
        if self.bot_speaking:
            self.barge_ins += 1

    def on_error(self, category: str) -> None:
        self.errors += 1
        self.errors_by_category[category] = self.errors_by_category.get(category, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The JSON body of ``GET /v1/phone/status``."""
        return {
            "state": self.state,
            "barge_in": "on" if self.barge_in else "off",
            "stt": {
                "backend": self.stt_backend,
                "chunk_ms": self.chunk_ms,
                "model_loaded": self.model_loaded,
            },
            "pipeline_running": self.pipeline_running,
            "last_turn_latency": self.last_turn.as_dict() if self.last_turn else None,
            "counts": {
                "turns": self.turns,
                "barge_ins": self.barge_ins,
                "interruptions": self.interruptions,  # every InterruptionFrame, barge-ins included
                "errors": self.errors,
                "errors_by_category": dict(self.errors_by_category),
            },
            "uptime_s": round(self._clock() - self._started_at, 1),
            "barge_in_shadow": self.shadow.summary(time.monotonic()) if self.shadow is not None else None,
        }


class StatusObserver(BaseObserver):
    """Keeps a :class:`CallStatus` up to date from the frames of a running pipeline.

    Frames that pipecat broadcasts both ways (speaking frames, interruptions) are counted on
    their downstream copy only; errors travel upstream and are counted once, at their first push.
    """

    def __init__(self, status: CallStatus, **kwargs) -> None:
        super().__init__(observe_every_push=False, **kwargs)
        self._status = status

    async def on_pipeline_started(self) -> None:
        self._status.on_pipeline_started()

    async def on_push_frame(self, data: FramePushed) -> None:
        frame, t = data.frame, data.timestamp
        s = self._status
        if isinstance(frame, ErrorFrame):
            category = frame.category.value if frame.category is not None else "unknown"
            s.on_error(str(category))
            return
        if isinstance(frame, MetricsFrame):
            for item in frame.data:
                if isinstance(item, TTFBMetricsData) and item.value > 0:
                    s.on_service_ttfb(item.processor, item.value)
            return
        if data.direction != FrameDirection.DOWNSTREAM:
            return
        if isinstance(frame, BotStartedSpeakingFrame):
            s.on_bot_started(t)
        elif isinstance(frame, BotStoppedSpeakingFrame):
            s.on_bot_stopped()
        elif isinstance(frame, UserStartedSpeakingFrame):
            s.on_user_started()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            s.on_user_stopped(t)
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            s.on_speech_end(t - int(frame.stop_secs * 1e9))
        elif isinstance(frame, TranscriptionFrame):
            s.on_transcript(t)
        elif isinstance(frame, LLMTextFrame):
            s.on_llm_text(t)
        elif isinstance(frame, TTSAudioRawFrame):
            s.on_tts_audio(t)
        elif isinstance(frame, InterruptionFrame):
            s.on_interruption()
        elif isinstance(frame, StartFrame):
            s.on_pipeline_started()
        elif isinstance(frame, (EndFrame, CancelFrame)):
            s.on_pipeline_ended()


def _token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing or undecodable header never matches."""
    if given is None:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


class _BadRequestsAsWarnings(logging.Filter):
    """aiohttp logs a request it cannot parse (garbage, a line too long, a body too big) at ERROR
    with a full traceback, so any local client could flood the log. Such a request becomes one
    WARNING line instead, at most one every ``every_s`` (with how many were not shown)."""

    def __init__(self, every_s: float = 10.0):
        super().__init__()
        self._every_s = every_s
        self._last = -every_s
        self._unshown = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._last < self._every_s:
            self._unshown += 1
            return False
        more = f" ({self._unshown} more since the last one)" if self._unshown else ""
        self._last, self._unshown = now, 0
        logger.warning(f"status port: refused a malformed request ({type(error).__name__}, HTTP {error.code}){more}")
        return False


_BAD_REQUESTS = _BadRequestsAsWarnings()


class StatusServer:
    """Serves a :class:`CallStatus` on ``host:port`` (127.0.0.1 by default; port 0 = ephemeral).

    ``start()`` and ``stop()`` are idempotent; ``port`` is the bound port once started. A port
    that cannot be bound is a :class:`~processors.errors.SetupError` naming ``STATUS_PORT``.
    """

    def __init__(
        self,
        status: CallStatus,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
    ) -> None:
        self._status = status
        self._host = host
        self._requested_port = port
        self._token = token or None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    def __str__(self) -> str:
        return f"StatusServer({self._host}:{self._port or self._requested_port})"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self}: not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        server_log = logging.getLogger("aiohttp.server")
        if _BAD_REQUESTS not in server_log.filters:
            server_log.addFilter(_BAD_REQUESTS)
        app = web.Application(client_max_size=1024)
        app.router.add_get(STATUS_PATH, self._handle_status)
        app.router.add_get(HEALTH_PATH, self._handle_health)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise SetupError(
                f"STATUS_PORT {self._requested_port}: cannot listen on {self._host} ({e.strerror or e}); "
                "stop what uses it or choose another port."
            ) from e
        self._runner = runner
        self._port = runner.addresses[0][1]
        if self._token is None:
            logger.warning(f"{self}: INTERNAL_TOKEN is not set; {STATUS_PATH} answers 503")
        logger.info(f"{self}: listening")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.debug(f"{self}: stopped")

    async def _handle_status(self, request: web.Request) -> web.Response:
        if self._token is None:
            return web.json_response(
                {"error": "status endpoint disabled: set INTERNAL_TOKEN to enable it"}, status=503
            )
        if not _token_matches(request.headers.get(TOKEN_HEADER), self._token):
            return web.json_response(
                {"error": f"missing or wrong {TOKEN_HEADER} header"}, status=401
            )
        return web.json_response(self._status.snapshot())

    async def _handle_health(self, request: web.Request) -> web.Response:
        ok = self._status.healthy
        return web.json_response({"ok": ok}, status=200 if ok else 503)

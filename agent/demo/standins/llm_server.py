"""An OpenAI-compatible chat-completions server on 127.0.0.1 that stands in for Gemma.

It speaks the wire protocol of llama.cpp / vLLM servers: ``POST /v1/chat/completions`` with
``stream: true`` answers ``text/event-stream`` chunks (``data: {...}``) ending in
``data: [DONE]``; ``GET /v1/models`` and ``GET /health`` answer too. Tokens are streamed with
configurable delays, and every request is recorded: what was asked, when the first token went
out, and when the client went away before the end (what an interruption looks like from the
server's side).

Fault modes make a failing server reproducible: ``error`` (HTTP 500), ``hang`` (headers, then
nothing), ``drop`` (close the connection after a few tokens). ``server.fault`` applies to the
next requests; ``server.fault_once`` to one request only.

Run standalone with ``python -m agent.demo.standins.llm_server --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from loguru import logger

from agent.demo.standins._serve import serve

Fault = Literal["none", "error", "hang", "drop"]

DEFAULT_REPLY = (
    "Of course. I heard you say: {heard}. It is a lovely day to talk. "
    "Tell me more whenever you are ready, I am listening."
)


@dataclass
class ChatRequestRecord:
    """What the server saw of one chat completion."""

    messages: list[dict]
    started_at: float
    first_token_at: float | None = None
    finished_at: float | None = None
    disconnected_at: float | None = None
    tokens_sent: int = 0
    fault: Fault = "none"
    pieces: list[tuple[float, str]] = field(default_factory=list)  # (time sent, text) of every token

    @property
    def completed(self) -> bool:
        return self.finished_at is not None and self.disconnected_at is None


@dataclass
class LLMStandInOptions:
    first_token_delay_s: float = 0.05
    token_delay_s: float = 0.02
    reply: Callable[[list[dict]], str] | None = None
    words_per_token: int = 1


@dataclass
class LLMStandIn:
    """The stand-in server; use ``async with LLMStandIn() as server: server.base_url``."""

    options: LLMStandInOptions = field(default_factory=LLMStandInOptions)
    host: str = "127.0.0.1"
    port: int = 0
    fault: Fault = "none"
    requests: list[ChatRequestRecord] = field(default_factory=list)
    replies: deque[str] = field(default_factory=deque)
    models_requests: int = 0  # GET /v1/models (the agent's warm-up at start)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._fault_once: deque[Fault] = deque()
        self._changed = asyncio.Event()

    # -- control ---------------------------------------------------------------------------
    def fault_once(self, fault: Fault) -> None:
        self._fault_once.append(fault)

    def queue_reply(self, text: str) -> None:
        """The next request answers exactly ``text`` (then the default reply again)."""
        self.replies.append(text)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (re-checked whenever a request changes state)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> LLMStandIn:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner, self.port = await serve(app, self.host, self.port, shutdown_timeout=0.5)
        logger.debug(f"LLM stand-in listening on {self.base_url}")
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> LLMStandIn:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers --------------------------------------------------------------------------
    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, _request: web.Request) -> web.Response:
        self.models_requests += 1
        self._changed.set()
        return web.json_response({"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def _reply_for(self, messages: list[dict]) -> str:
        if self.replies:
            return self.replies.popleft()
        if self.options.reply is not None:
            return self.options.reply(messages)
        heard = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        if isinstance(heard, list):  # content parts
            heard = " ".join(part.get("text", "") for part in heard if isinstance(part, dict))
        return DEFAULT_REPLY.format(heard=str(heard).strip() or "nothing")

    def _notify(self) -> None:
        self._changed.set()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            messages = list(body["messages"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        except ConnectionResetError:  # the client gave up before its request was in (a withdrawn answer)
            logger.debug("LLM stand-in: a client hung up while sending its request")
            return web.Response(status=499)
        fault = self._fault_once.popleft() if self._fault_once else self.fault
        record = ChatRequestRecord(messages=messages, started_at=time.monotonic(), fault=fault)
        self.requests.append(record)
        self._notify()
        if fault == "error":
            record.finished_at = time.monotonic()
            self._notify()
            return web.json_response({"error": {"message": "stand-in failure"}}, status=500)
        if not body.get("stream"):
            text = self._reply_for(messages)
            record.finished_at = time.monotonic()
            self._notify()
            return web.json_response(_completion(body.get("model", "stand-in"), text))
        return await self._stream(request, body.get("model", "stand-in"), record)

    async def _stream(self, request: web.Request, model: str, record: ChatRequestRecord) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        words = self._reply_for(record.messages).split(" ")
        step = max(1, self.options.words_per_token)
        pieces = [" ".join(words[i : i + step]) + " " for i in range(0, len(words), step)]
        try:
            if not await self._sleep_connected(request, self.options.first_token_delay_s, record):
                return response
            if record.fault == "hang":
                await self._sleep_connected(request, 3600.0, record)
                return response
            for index, piece in enumerate(pieces):
                if record.fault == "drop" and index == 3:
                    request.transport.close()  # type: ignore[union-attr]
                    record.finished_at = time.monotonic()
                    return response
                await response.write(_sse(_chunk(model, {"content": piece})))
                record.tokens_sent += 1
                record.pieces.append((time.monotonic(), piece))
                record.first_token_at = record.first_token_at or time.monotonic()
                self._notify()
                if not await self._sleep_connected(request, self.options.token_delay_s, record):
                    return response
            await response.write(_sse(_chunk(model, {}, finish="stop")))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            record.finished_at = time.monotonic()
        except (ConnectionResetError, asyncio.CancelledError):
            self._mark_disconnected(record)
            raise
        finally:
            self._notify()
        return response

    async def _sleep_connected(self, request: web.Request, seconds: float, record: ChatRequestRecord) -> bool:
        """Sleep, checking every 5 ms that the client is still there; False if it left."""
        deadline = time.monotonic() + seconds
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                self._mark_disconnected(record)
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            await asyncio.sleep(min(0.005, remaining))

    def _mark_disconnected(self, record: ChatRequestRecord) -> None:
        if record.disconnected_at is None and record.finished_at is None:
            record.disconnected_at = time.monotonic()
            self._notify()


def _chunk(model: str, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _completion(model: str, text: str) -> dict:
    return {
        "id": "chatcmpl-standin",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _serve(port: int, token_delay_s: float) -> None:
    server = LLMStandIn(options=LLMStandInOptions(token_delay_s=token_delay_s), port=port)
    async with server:
        print(f"LLM stand-in on {server.base_url}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds between tokens")
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.token_delay))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

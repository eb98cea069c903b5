"""The status endpoint: state from real pipeline frames, token checks over real HTTP."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ErrorFrame,
    InterruptionFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.filters.identity_filter import IdentityFilter
from pipecat.tests.utils import SleepFrame, run_test

from agent.status import CallStatus, StatusObserver, StatusServer

TOKEN = "s3cret-token-for-tests"
SECRET_WORDS = "my bank pin is four four two one"


def _status(**kw) -> CallStatus:
    defaults = dict(barge_in=True, stt_backend="nemotron", chunk_ms=160, model_loaded=True)
    defaults.update(kw)
    return CallStatus(**defaults)


def test_state_follows_user_and_bot_speech():
    s = _status()
    assert s.state == "idle"
    s.on_user_started()
    assert s.state == "listening"
    s.on_user_stopped(1)
    assert s.state == "idle"
    s.on_bot_started(2)
    assert s.state == "speaking"
    s.on_interruption()
    s.on_bot_stopped()
    assert s.state == "idle"
    assert (s.barge_ins, s.interruptions) == (1, 1)
    s.on_interruption()  # bot silent: an interruption, not a barge-in
    assert (s.barge_ins, s.interruptions) == (1, 2)


async def test_observer_builds_turn_latency_from_pipeline_frames():
    status = _status()
    audio = TTSAudioRawFrame(audio=b"\x00\x00" * 160, sample_rate=16000, num_channels=1)
    frames = [
        UserStartedSpeakingFrame(),
        SleepFrame(sleep=0.05),
        VADUserStoppedSpeakingFrame(stop_secs=0.2),
        SleepFrame(sleep=0.03),
        TranscriptionFrame(SECRET_WORDS, "caller", "2026-01-01T00:00:00"),
        SleepFrame(sleep=0.03),
        UserStoppedSpeakingFrame(),
        SleepFrame(sleep=0.05),
        LLMTextFrame("Your secret is safe"),
        SleepFrame(sleep=0.05),
        audio,
        SleepFrame(sleep=0.02),
        BotStartedSpeakingFrame(),
        SleepFrame(sleep=0.02),
        InterruptionFrame(),
        BotStoppedSpeakingFrame(),
        ErrorFrame("tts server went away"),
    ]
    await run_test(IdentityFilter(), frames_to_send=frames, observers=[StatusObserver(status)])

    assert status.turns == 1
    assert (status.barge_ins, status.interruptions, status.errors) == (1, 1, 1)
    lat = status.last_turn
    assert lat is not None
    parts = [lat.endpointing_ms, lat.stt_ms, lat.llm_ttfb_ms, lat.tts_ttfb_ms, lat.transport_ms]
    assert all(p is not None and p > 0 for p in parts), parts
    # The VAD's stop_secs counts: the caller went quiet 200 ms before the VAD said so.
    assert lat.endpointing_ms >= 200
    assert lat.total_ms == pytest.approx(
        lat.endpointing_ms + lat.llm_ttfb_ms + lat.tts_ttfb_ms + lat.transport_ms, abs=1.0
    )
    body = json.dumps(status.snapshot())
    assert "bank" not in body and "secret" not in body.lower()
    assert status.state == "idle" and not status.pipeline_running  # EndFrame went through


async def test_greeting_without_user_turn_records_no_latency():
    status = _status()
    await run_test(
        IdentityFilter(),
        frames_to_send=[BotStartedSpeakingFrame(), BotStoppedSpeakingFrame()],
        observers=[StatusObserver(status)],
    )
    assert status.turns == 0 and status.last_turn is None


@pytest.fixture
async def server():
    status = _status(model_loaded=False)
    srv = StatusServer(status, port=0, token=TOKEN)
    await srv.start()
    yield srv, status
    await srv.stop()


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers or {}) as resp:
            return resp.status, await resp.json()


async def test_status_requires_the_token(server):
    srv, _ = server
    url = srv.url + "/v1/phone/status"
    assert (await _get(url))[0] == 401
    assert (await _get(url, {"X-Internal-Token": TOKEN + "x"}))[0] == 401
    assert (await _get(url, {"X-Internal-Token": ""}))[0] == 401
    code, body = await _get(url, {"X-Internal-Token": TOKEN})
    assert code == 200
    assert body["state"] == "idle"
    assert body["barge_in"] == "on"
    assert body["stt"] == {"backend": "nemotron", "chunk_ms": 160, "model_loaded": False}
    assert body["counts"]["barge_ins"] == 0 and body["last_turn_latency"] is None


async def test_status_reflects_live_changes(server):
    srv, status = server
    status.on_bot_started(5)
    status.on_error("network")
    code, body = await _get(srv.url + "/v1/phone/status", {"X-Internal-Token": TOKEN})
    assert code == 200
    assert body["state"] == "speaking"
    assert body["counts"]["errors"] == 1
    assert body["counts"]["errors_by_category"] == {"network": 1}


async def test_health_needs_no_token_and_says_ok_only_when_running(server):
    srv, status = server
    code, body = await _get(srv.url + "/health")
    assert (code, body) == (503, {"ok": False})
    status.model_loaded = True
    status.on_pipeline_started()
    code, body = await _get(srv.url + "/health")
    assert (code, body) == (200, {"ok": True})


async def test_no_token_configured_closes_the_endpoint():
    srv = StatusServer(_status(), port=0, token=None)
    await srv.start()
    try:
        code, body = await _get(srv.url + "/v1/phone/status", {"X-Internal-Token": "anything"})
        assert code == 503
        assert "INTERNAL_TOKEN" in body["error"]
    finally:
        await srv.stop()


async def _raw_request(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(4096), timeout=5)
    writer.close()
    await writer.wait_closed()
    return data


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/phone/status HTTP/9.9\r\n\r\n",
        b"GET /v1/phone/status HTTP/1.1\r\nHost: x\r\nX-Internal-Token: \xff\xfe\xe9t\r\n\r\n",
        b"GET /v1/phone/status HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n",
    ],
)
async def test_malformed_requests_get_4xx_and_server_survives(server, payload):
    srv, _ = server
    answer = await _raw_request(srv.port, payload)
    status_line = answer.split(b"\r\n", 1)[0]
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", status_line), status_line
    code, _ = await _get(srv.url + "/v1/phone/status", {"X-Internal-Token": TOKEN})
    assert code == 200


async def test_wrong_method_and_path_are_4xx(server):
    srv, _ = server
    async with aiohttp.ClientSession() as session:
        async with session.post(srv.url + "/v1/phone/status", data=b"x" * 10) as resp:
            assert resp.status == 405
        async with session.get(srv.url + "/v1/phone/transcripts") as resp:
            assert resp.status == 404


async def test_start_stop_idempotent_and_bound_to_loopback():
    srv = StatusServer(_status(), port=0, token=TOKEN)
    await srv.start()
    port = srv.port
    await srv.start()
    assert srv.port == port
    assert srv.url == f"http://127.0.0.1:{port}"
    await srv.stop()
    await srv.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(f"http://127.0.0.1:{port}/health")


async def test_port_in_use_is_a_clear_error():
    first = StatusServer(_status(), port=0, token=TOKEN)
    await first.start()
    try:
        second = StatusServer(_status(), port=first.port, token=TOKEN)
        with pytest.raises(OSError, match="STATUS_PORT"):
            await second.start()
    finally:
        await first.stop()

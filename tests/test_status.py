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
from processors.errors import SetupError

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


async def test_status_shows_the_calls_shadow_summary(server):
    from agent.bargein.core import BargeInParams
    from agent.bargein.shadow import ShadowLog

    srv, status = server
    _, body = await _get(srv.url + "/v1/phone/status", {"X-Internal-Token": TOKEN})
    assert body["barge_in_shadow"] is None  # shadow mode off
    status.shadow = log = ShadowLog(BargeInParams(window_s=1.0))
    log.bot_started(0.0)
    log.voice(1.0, started=True)
    log.voice(1.1, started=False)
    log.tick(1.5)
    _, body = await _get(srv.url + "/v1/phone/status", {"X-Internal-Token": TOKEN})
    shown = body["barge_in_shadow"]
    assert (shown["would_pause"], shown["would_resume"], shown["would_commit"]) == (1, 1, 0)
    assert shown["annie_speech_min"] > 0


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


async def test_a_flood_of_garbage_requests_logs_one_warning_and_no_traceback(server, capfd, monkeypatch):
    """A local client sending garbage must not flood the log: aiohttp's ERROR with a traceback
    becomes one WARNING line, at most one every 10 s (the rest counted in the next one)."""
    from loguru import logger

    from agent.status import _BAD_REQUESTS

    monkeypatch.setattr(_BAD_REQUESTS, "_last", float("-inf"))  # earlier tests' warnings do not count
    srv, _ = server
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        for _ in range(20):
            await _raw_request(srv.port, b"\x16\x03\x01 not http\r\n\r\n")
            await _raw_request(srv.port, b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
    finally:
        logger.remove(sink)
    printed = capfd.readouterr().err
    assert "Traceback" not in printed and "Error handling request" not in printed
    refused = [w for w in warnings if "malformed request" in w]
    assert len(refused) == 1, warnings
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
        with pytest.raises(SetupError, match="STATUS_PORT"):
            await second.start()
    finally:
        await first.stop()


# --- a real call: the assembled pipeline, the LLM and Chatterbox stand-ins over HTTP ---------------

LONG_REPLY = (
    "Once upon a time there was a little village by the sea. Every morning the fishermen went out. "
    "They came back at noon with baskets full of silver fish. The children ran down to meet them."
)


@pytest.fixture
async def tts_server():
    from agent.demo.standins.tts_server import TTSStandIn

    async with TTSStandIn() as server:
        yield server


async def test_status_follows_a_real_call_with_barge_in(make_settings, llm_server, tts_server):
    from pipecat.workers.runner import WorkerRunner

    from agent.pipeline import build_call_pipeline
    from agent.services import build_llm, build_tts
    from agent.demo.call import CallHarness, FrameLog
    from transports.rig.simulated import SimulatedPhoneTransport

    settings = make_settings(enable_barge_in=True)
    status = CallStatus.from_settings(settings, model_loaded=True)
    server = StatusServer(status, port=0, token=TOKEN)
    await server.start()
    llm_server.queue_reply(LONG_REPLY)
    transport, log, tts = SimulatedPhoneTransport(), FrameLog(), build_tts(settings, base_url=tts_server.url)
    call = build_call_pipeline(
        settings, transport=transport, stt=IdentityFilter(), tts=tts, vad_analyzer=None,
        llm=build_llm(settings, base_url=llm_server.base_url), observers=[log, StatusObserver(status)],
    )
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(call.worker)
    task = asyncio.create_task(runner.run())
    harness = CallHarness(call, transport, log, tts)
    headers = {"X-Internal-Token": TOKEN}
    try:
        await harness.wait_until(lambda: status.pipeline_running, 10, "the pipeline to start")
        assert (await _get(server.url + "/health")) == (200, {"ok": True})
        code, body = await _get(server.url + "/v1/phone/status", headers)
        assert (code, body["state"], body["barge_in"], body["stt"]["backend"]) == (200, "idle", "on", "whisper")

        await harness.caller_says("what is the weather like in the village")
        await harness.wait_speaking()
        _, body = await _get(server.url + "/v1/phone/status", headers)
        assert body["state"] == "speaking" and body["counts"]["turns"] == 1
        lat = body["last_turn_latency"]
        for part in ("endpointing_ms", "llm_ttfb_ms", "tts_ttfb_ms", "transport_ms", "total_ms"):
            assert lat[part] is not None and lat[part] >= 0, (part, lat)
        assert lat["total_ms"] >= lat["llm_ttfb_ms"] + lat["tts_ttfb_ms"]

        await harness.caller_says("stop please")
        await harness.wait_until(lambda: status.barge_ins == 1, 5, "the barge-in to be counted")
        _, body = await _get(server.url + "/v1/phone/status", headers)
        assert body["counts"]["barge_ins"] == 1 and body["counts"]["errors"] == 0
        text = json.dumps(body).lower()
        assert "weather" not in text and "village" not in text and "stop please" not in text
    finally:
        await call.worker.cancel(reason="test over")
        await asyncio.wait_for(task, 10)
        assert (await _get(server.url + "/health"))[0] == 503  # the call is over
        await server.stop()

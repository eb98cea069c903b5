"""ChatterboxTTSService against the Chatterbox stand-in server (real HTTP on 127.0.0.1).

The stand-in streams espeak-ng speech in paced chunks and records what the server side sees
(bytes, disconnects). Frames are observed at the end of a real pipeline, where the output
transport would be.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time

import httpx
import numpy as np
import pytest
from loguru import logger
from pipecat.frames.frames import ErrorFrame, InterruptionFrame, TTSSpeakFrame, TTSStoppedFrame

from agent.demo.standins.tts_server import TTSStandIn, TTSStandInOptions, TTSStandInProcess, split_sentences, synthesize
from processors.chatterbox.smoke import TTSProbe, open_tcp_connections, run_smoke_test
from processors.chatterbox.tts import ChatterboxTTSService
from processors.prefetch import FirstSentence, TTSPrefetchFrame, sentence_key

SHORT = "Hello there. How are you today?"
LONG = (
    "This is a long answer that keeps going for a while. It has several sentences in it. "
    "Each one is synthesized and streamed in small chunks. The caller may interrupt at any time."
)


def expected_pcm(text: str) -> bytes:
    return b"".join(synthesize(s) for s in split_sentences(text))


def make_tts(url: str, **kwargs) -> ChatterboxTTSService:
    kwargs.setdefault("voice", "default")
    return ChatterboxTTSService(base_url=url, **kwargs)


@pytest.fixture
async def server():
    async with TTSStandIn(options=TTSStandInOptions(first_byte_delay_s=0.02)) as srv:
        yield srv


@pytest.fixture
def log_lines():
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(m.record["level"].name + " " + m.record["message"]),
                         level="WARNING")
    yield lines
    logger.remove(sink_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def speak_and_wait(probe: TTSProbe, text: str, timeout: float = 20.0) -> str:
    """Speak ``text``, wait for the TTSStoppedFrame of an utterance that played; its context id."""
    done = {a.frame.context_id for a in probe.sink.frames(TTSStoppedFrame)}

    def new_spoken() -> list[str]:
        return [a.frame.context_id for a in probe.sink.frames(TTSStoppedFrame)
                if a.frame.context_id not in done and probe.audio(a.frame.context_id)]

    await probe.send(TTSSpeakFrame(text))
    assert await probe.sink.wait_for(lambda: bool(new_spoken()), timeout)
    return new_spoken()[0]


def audio_bytes(probe: TTSProbe, context_id: str) -> bytes:
    return b"".join(a.frame.audio for a in probe.audio(context_id))


# -- audio path ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("streaming", "headers"),
    [(True, "per_request"), (True, "per_sentence"), (False, "per_request")],
)
async def test_plays_exactly_the_servers_audio(server, streaming, headers):
    server.options.headers = headers
    async with TTSProbe(make_tts(server.url, streaming=streaming)) as probe:
        context_id = await speak_and_wait(probe, SHORT)
    assert audio_bytes(probe, context_id) == expected_pcm(SHORT)
    assert all(a.frame.sample_rate == 24000 for a in probe.audio())
    assert server.requests[-1].path.endswith("/stream") == streaming
    assert server.requests[-1].body["voice"] == "default"
    assert server.requests[-1].body["exaggeration"] == 0.5
    assert probe.errors() == []


async def test_an_llm_reply_is_spoken_sentence_by_sentence_in_order(server):
    from pipecat.frames.frames import LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame

    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(LLMFullResponseStartFrame())
        for token in ["Hello ", "there. ", "How ", "are ", "you ", "today?"]:
            await probe.send(LLMTextFrame(token))
        await probe.send(LLMFullResponseEndFrame())
        assert await probe.sink.wait_for(lambda: bool(probe.sink.frames(TTSStoppedFrame)), 20)
    assert [r.body["input"] for r in server.requests] == ["Hello there.", "How are you today?"]
    context_id = probe.sink.frames(TTSStoppedFrame)[0].frame.context_id
    assert audio_bytes(probe, context_id) == synthesize("Hello there.") + synthesize("How are you today?")
    assert probe.errors() == []


async def test_first_audio_is_pushed_while_the_server_is_still_streaming(server):
    server.options.realtime_factor = 1.0  # as slow as speech: the answer takes seconds to send
    async with TTSProbe(make_tts(server.url)) as probe:
        sent = await probe.send(TTSSpeakFrame(LONG))
        assert await probe.sink.wait_for(lambda: bool(probe.audio()), 10)
        first = probe.audio()[0]
        record = server.requests[-1]
        assert record.last_byte_at is not None and record.generation_done_at is None
        # No half-second buffering: the first frame holds about one network chunk of audio.
        assert len(first.frame.audio) < 0.25 * 24000 * 2
        await probe.send(InterruptionFrame())
    print(f"\nfirst audio {1000 * (first.at - sent):.1f} ms after the request, "
          f"{1000 * (first.at - record.first_byte_at):.1f} ms after the server's first byte")


async def test_resamples_to_the_output_rate(server):
    async with TTSProbe(make_tts(server.url), audio_out_sample_rate=16000) as probe:
        context_id = await speak_and_wait(probe, SHORT)
    frames = probe.audio(context_id)
    assert frames and all(a.frame.sample_rate == 16000 for a in frames)
    got = np.frombuffer(audio_bytes(probe, context_id), dtype=np.int16)
    sent = np.frombuffer(expected_pcm(SHORT), dtype=np.int16)
    assert abs(len(got) / 16000 - len(sent) / 24000) < 0.01
    assert np.sqrt(np.mean(got.astype(float) ** 2)) > 0.5 * np.sqrt(np.mean(sent.astype(float) ** 2))


# -- interruption ------------------------------------------------------------------------------


async def test_interruption_closes_the_request_and_the_server_sees_it(server):
    server.options.realtime_factor = 1.0
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSSpeakFrame(LONG))
        assert await probe.sink.wait_for(lambda: bool(probe.audio()), 10)
        cancel_at = await probe.send(InterruptionFrame())
        await server.wait_for(lambda: server.requests[-1].disconnected_at is not None, 5)
        record = server.requests[-1]
        assert not record.completed
        assert record.bytes_sent < len(expected_pcm(LONG))
        assert probe.tts.requests_in_flight == 0
        # Like the real server, the stand-in goes on generating after the disconnect.
        await server.wait_for(lambda: record.generation_done_at is not None, 15)
    assert probe.errors() == []
    print(f"\ncancel -> server saw the disconnect: {1000 * (record.disconnected_at - cancel_at):.1f} ms")


async def test_no_stale_audio_after_a_cancel_and_the_next_utterance_is_clean(server):
    server.options.realtime_factor = 1.0
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSSpeakFrame(LONG))
        assert await probe.sink.wait_for(lambda: bool(probe.audio()), 10)
        old_context = probe.audio()[0].frame.context_id
        await probe.send(InterruptionFrame())
        server.options.realtime_factor = 20.0
        new_context = await speak_and_wait(probe, SHORT)
        interrupted_at = probe.sink.frames(InterruptionFrame)[0].at
    assert new_context != old_context
    assert [a for a in probe.audio(old_context) if a.at > interrupted_at] == []
    assert audio_bytes(probe, new_context) == expected_pcm(SHORT)
    assert probe.errors() == []


async def test_interrupt_hook_closes_the_request_even_if_nothing_cancels_the_task(server):
    server.options.realtime_factor = 1.0
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSSpeakFrame(LONG))
        assert await probe.sink.wait_for(lambda: bool(probe.audio()), 10)
        context_id = probe.audio()[0].frame.context_id
        await probe.tts.on_audio_context_interrupted(context_id)
        await server.wait_for(lambda: server.requests[-1].disconnected_at is not None, 5)
        assert await probe.sink.wait_for(lambda: probe.tts.requests_in_flight == 0, 5)
        await probe.send(InterruptionFrame())
    assert probe.errors() == []


# -- a sentence synthesized ahead (preemptive generation) -------------------------------------


async def test_a_prefetched_sentence_plays_from_its_own_request(server):
    """Synthesized ahead, asked for later: one request, its audio exact, nothing pushed before."""
    server.options.first_byte_delay_s = 0.3
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSPrefetchFrame(text="Hello  there."))
        await server.wait_for(lambda: server.requests and server.requests[0].finished_at is not None, 5)
        assert probe.audio() == [], "nothing of a prefetch is pushed before it is asked for"
        asked = time.monotonic()
        context_id = await speak_and_wait(probe, "Hello there.")
        first_audio = probe.audio(context_id)[0].at
    assert [r.body["input"] for r in server.requests] == ["Hello  there."]
    assert audio_bytes(probe, context_id) == synthesize("Hello there.")
    assert first_audio - asked < server.options.first_byte_delay_s, "played from the buffer, not a new request"
    assert probe.tts.prefetches == {"started": 1, "played": 1, "dropped": 0}
    assert probe.errors() == []


async def test_an_llm_answer_asks_for_the_prefetched_first_sentence(server):
    """The sentence the LLM side cuts (processors.prefetch.FirstSentence) is the TTS's own."""
    from pipecat.frames.frames import LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame

    tokens = ["Dr. ", "Smith ", "is ", "in ", "at ", "3.30 ", "today. ", "Shall ", "I ", "call?"]
    first = FirstSentence()
    sentence = next(s for s in [await first.feed(t) for t in tokens] if s)
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSPrefetchFrame(text=sentence))
        await probe.send(LLMFullResponseStartFrame())
        for token in tokens:
            await probe.send(LLMTextFrame(token))
        await probe.send(LLMFullResponseEndFrame())
        assert await probe.sink.wait_for(lambda: bool(probe.sink.frames(TTSStoppedFrame)), 20)
    assert [r.body["input"] for r in server.requests] == ["Dr. Smith is in at 3.30 today.", "Shall I call?"]
    assert probe.tts.prefetches["played"] == 1


async def test_a_withdrawn_answer_drops_its_prefetch_and_closes_the_request(server):
    from pipecat.frames.frames import EagerEndOfTurnCancelFrame

    server.options.realtime_factor = 1.0  # slow: the request is still open when it is withdrawn
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSPrefetchFrame(text=LONG))
        await server.wait_for(lambda: server.requests and server.requests[0].first_byte_at is not None, 5)
        await probe.send(EagerEndOfTurnCancelFrame())
        await server.wait_for(lambda: server.requests[0].disconnected_at is not None, 5)
        context_id = await speak_and_wait(probe, SHORT)
    assert not server.requests[0].completed
    assert [r.body["input"] for r in server.requests] == [LONG, SHORT]
    assert probe.audio() == probe.audio(context_id), "nothing of the withdrawn answer was pushed"
    assert probe.tts.prefetches == {"started": 1, "played": 0, "dropped": 1}


async def test_a_prefetch_is_used_only_for_its_own_sentence_and_only_while_fresh(server):
    async with TTSProbe(make_tts(server.url, prefetch_ttl_s=0.5)) as probe:
        await probe.send(TTSPrefetchFrame(text="Hello there."))
        await speak_and_wait(probe, "How are you today?")  # another sentence: its own request
        assert probe.tts.prefetches == {"started": 1, "played": 0, "dropped": 0}
        await asyncio.sleep(0.6)
        context_id = await speak_and_wait(probe, "Hello there.")  # too late: a fresh request
    assert [r.body["input"] for r in server.requests] == ["Hello there.", "How are you today?", "Hello there."]
    assert audio_bytes(probe, context_id) == synthesize("Hello there.")
    assert probe.tts.prefetches == {"started": 1, "played": 0, "dropped": 1}


async def test_a_failed_prefetch_is_retried_when_its_sentence_is_asked_for(server):
    server.fault_once("http_500")
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSPrefetchFrame(text="Hello there."))
        await server.wait_for(lambda: bool(server.requests), 5)
        await asyncio.sleep(0.2)  # the 500 is in the prefetch's buffer before its sentence is asked for
        context_id = await speak_and_wait(probe, "Hello there.")
    assert [r.status for r in server.requests] == [500, 200]
    assert audio_bytes(probe, context_id) == synthesize("Hello there.")
    assert probe.errors() == []


def test_first_sentence_is_cut_once_and_a_one_sentence_answer_at_its_end():
    async def cut(tokens: list[str]) -> list[str | None]:
        first = FirstSentence()
        return [await first.feed(t) for t in tokens] + [first.flush()]

    assert asyncio.run(cut(["Hello ", "there. ", "How ", "are ", "you? ", "Fine."])) == \
        [None, None, "Hello there.", None, None, None, None]
    assert asyncio.run(cut(["It ", "is ", "three."])) == [None, None, None, "It is three."]
    assert asyncio.run(cut([" "])) == [None, None]
    assert sentence_key(" Hello\n  there. ") == "Hello there."


# -- errors ----------------------------------------------------------------------------------


async def test_connection_refused_retries_once_then_errors_and_the_call_goes_on(log_lines):
    url = f"http://127.0.0.1:{free_port()}"
    async with TTSProbe(make_tts(url, retry_backoff_s=0.01)) as probe:
        await probe.send(TTSSpeakFrame(SHORT))
        assert await probe.upstream.wait_for(lambda: len(probe.errors()) >= 1, 10)
        await probe.send(TTSSpeakFrame(SHORT))
        assert await probe.upstream.wait_for(
            lambda: sum("Chatterbox TTS failed" in e.error for e in probe.errors()) >= 2, 10)
    assert any("not reachable yet" in line for line in log_lines)  # the health check at start
    assert sum("will retry" in line for line in log_lines) == 2  # one retry per utterance
    assert "connection refused" in probe.errors()[0].error
    assert probe.audio() == []


async def test_a_5xx_is_retried_once_and_then_succeeds(server):
    server.fault_once("http_500")
    async with TTSProbe(make_tts(server.url, retry_backoff_s=0.01)) as probe:
        context_id = await speak_and_wait(probe, SHORT)
    assert [r.status for r in server.requests] == [500, 200]
    assert audio_bytes(probe, context_id) == expected_pcm(SHORT)
    assert probe.errors() == []


async def test_a_5xx_twice_becomes_an_error_frame_and_the_next_utterance_works(server):
    server.fault_once("http_503", "http_503")
    async with TTSProbe(make_tts(server.url, retry_backoff_s=0.01)) as probe:
        await probe.send(TTSSpeakFrame(SHORT))
        assert await probe.upstream.wait_for(lambda: bool(probe.errors()), 10)
        context_id = await speak_and_wait(probe, SHORT)
    assert [r.status for r in server.requests] == [503, 503, 200]
    assert "HTTP 503" in probe.errors()[0].error
    assert not probe.errors()[0].fatal
    assert audio_bytes(probe, context_id) == expected_pcm(SHORT)


async def test_a_4xx_is_not_retried_and_the_service_stays_usable(server):
    server.fault_once("http_422")
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSSpeakFrame(SHORT))
        assert await probe.upstream.wait_for(lambda: bool(probe.errors()), 10)
        context_id = await speak_and_wait(probe, SHORT)
        assert probe.tts.is_usable
    assert [r.status for r in server.requests] == [422, 200]
    assert "HTTP 422" in probe.errors()[0].error
    assert audio_bytes(probe, context_id) == expected_pcm(SHORT)


async def test_a_server_slower_than_the_first_byte_timeout_is_cut_off(server):
    server.fault = "hang"
    async with TTSProbe(make_tts(server.url, first_byte_timeout_s=0.3, retry_backoff_s=0.01)) as probe:
        started = await probe.send(TTSSpeakFrame(SHORT))
        assert await probe.upstream.wait_for(lambda: bool(probe.errors()), 10)
        await server.wait_for(lambda: all(r.disconnected_at for r in server.requests), 5)
    assert len(server.requests) == 2  # one retry
    for record in server.requests:
        assert record.bytes_sent == 0
        assert 0.25 < record.disconnected_at - record.started_at < 10.0  # cut off, not left hanging 30 s
    assert "no audio within 0.3 s" in probe.errors()[0].error
    print(f"\nfirst error {1000 * (probe.upstream.frames(ErrorFrame)[0].at - started):.0f} ms after the request")


async def test_a_stray_odd_byte_is_dropped_with_a_warning(server, log_lines):
    server.fault = "odd_length"
    async with TTSProbe(make_tts(server.url)) as probe:
        context_id = await speak_and_wait(probe, SHORT)
    assert audio_bytes(probe, context_id) == expected_pcm(SHORT)
    assert any("odd byte count" in line for line in log_lines)
    assert probe.errors() == []


@pytest.mark.parametrize("fault", ["garbage", "bad_header"])
async def test_malformed_audio_is_dropped_with_a_warning(server, log_lines, fault):
    server.fault = fault
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSSpeakFrame(SHORT))
        await server.wait_for(lambda: bool(server.requests) and (server.requests[-1].finished_at or server.requests[-1].disconnected_at), 10)
        assert await probe.sink.wait_for(lambda: probe.tts.requests_in_flight == 0, 5)
        assert await probe.sink.wait_for(lambda: any("malformed" in line for line in log_lines), 5)
    assert probe.audio() == []
    assert len(server.requests) == 1  # bad audio is not retried
    assert not any("Chatterbox TTS failed" in e.error for e in probe.errors())


async def test_a_connection_dropped_mid_stream_keeps_the_audio_and_reports_an_error(server):
    server.fault = "drop"
    async with TTSProbe(make_tts(server.url)) as probe:
        await probe.send(TTSSpeakFrame(LONG))
        assert await probe.upstream.wait_for(lambda: bool(probe.errors()), 10)
    assert len(server.requests) == 1  # audio was already played: no retry
    played = b"".join(a.frame.audio for a in probe.audio())
    assert 0 < len(played) <= server.requests[0].bytes_sent
    assert expected_pcm(LONG).startswith(played)
    assert "closed the connection" in probe.errors()[0].error


# -- health, lifecycle, smoke ------------------------------------------------------------------


async def test_health_check_passes_against_a_running_server(server):
    async with TTSProbe(make_tts(server.url)) as probe:
        assert await probe.tts.check_health()


async def test_client_is_closed_at_the_end_and_close_is_idempotent(server):
    tts = make_tts(server.url)
    async with TTSProbe(tts) as probe:
        await speak_and_wait(probe, SHORT)
        assert open_tcp_connections(server.url) == 1  # the idle keep-alive connection
    assert open_tcp_connections(server.url) == 0
    await tts.cleanup()  # a second teardown is harmless
    assert open_tcp_connections(server.url) == 0


async def test_smoke_test_passes_against_the_stand_in(server):
    server.options.realtime_factor = 1.0
    result = await run_smoke_test(server.url, cancel_after_s=0.2)
    assert result.passed, result.reason
    assert result.audio_frames_after_cancel == 0
    assert server.requests[-1].disconnected_at is not None


async def test_smoke_test_fails_when_the_server_is_down():
    result = await run_smoke_test(f"http://127.0.0.1:{free_port()}")
    assert not result.passed
    assert "not reachable" in result.reason


def test_rejects_a_url_that_is_not_http():
    with pytest.raises(ValueError, match="http"):
        ChatterboxTTSService(base_url="127.0.0.1:4123", voice="default")


# -- leaks ----------------------------------------------------------------------------------


def live(kind: type) -> int:
    count = 0
    for o in gc.get_objects():
        try:
            count += isinstance(o, kind)
        except ReferenceError:  # a dead weakref.proxy another library left behind: not ours
            pass
    return count


async def cancel_many(probe: TTSProbe, count: int) -> None:
    for _ in range(count):
        seen = len(probe.sink.frames(InterruptionFrame))
        await probe.send(TTSSpeakFrame(LONG))
        assert await probe.sink.wait_for(lambda: bool(probe.audio()), 10)
        await probe.send(InterruptionFrame())
        assert await probe.sink.wait_for(lambda: len(probe.sink.frames(InterruptionFrame)) > seen, 10)
        probe.sink.arrivals.clear()
        probe.upstream.arrivals.clear()


@pytest.mark.slow
async def test_500_cancelled_utterances_leak_no_connection_task_or_memory():
    import tracemalloc

    # The server runs in its own process, so what is measured here is the client alone.
    with TTSStandInProcess(first_byte_delay_s=0.0, realtime_factor=2.0) as server:
        async with TTSProbe(make_tts(server.url)) as probe:
            await cancel_many(probe, 50)  # warm up caches, pools and lazily built objects
            await asyncio.sleep(0.2)
            gc.collect()
            tasks_before = len(asyncio.all_tasks())
            tracemalloc.start()
            memory_before = tracemalloc.get_traced_memory()[0]
            started = time.monotonic()
            await cancel_many(probe, 500)
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.2)
            gc.collect()
            memory_growth = tracemalloc.get_traced_memory()[0] - memory_before
            tracemalloc.stop()
            tasks_after = len(asyncio.all_tasks())
            client_sockets = open_tcp_connections(server.url)
            responses = live(httpx.Response)
            stats = await asyncio.to_thread(server.stats)
    print(f"\n500 cancels in {elapsed:.1f} s; tasks {tasks_before}->{tasks_after}; "
          f"memory +{memory_growth / 1e3:.0f} kB; sockets client {client_sockets}; server {stats}")
    assert stats["requests"] == 550 and stats["disconnected"] == 550  # every cancel reached the server
    assert client_sockets <= 1 and stats["open_connections"] <= 1  # at most one idle keep-alive
    assert tasks_after <= tasks_before
    assert responses <= 1
    assert memory_growth < 1_000_000  # 2 kB kept per cancelled utterance would show

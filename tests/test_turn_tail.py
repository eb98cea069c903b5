"""The late tail of the turn Annie is answering does not interrupt her (barge-in without pause first).

Found in a full test run on a busy 2-core machine: the VAD split the caller's first question,
the turn ended on the head's final ("What is the weather like?"), Annie answered, and Whisper's
final of the tail ("the day.") came 1.5 s into her answer. Pipecat's transcript start strategy
took it for the caller talking over her and cut her off. The rule is
:class:`agent.bargein.core.AnsweredTurnTail` (tables in ``test_bargein_core.py``); this drives
the pipecat strategy that carries it with frames.
"""

from __future__ import annotations

import asyncio

import pytest
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult

from agent.bargein.strategy import TranscriptTurnStartStrategy


def final(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text, "caller", "2026-12-06T00:00:00Z")


async def drive(frames, in_flight: bool):
    """Feed ``frames`` to the strategy (the STT's in-flight answer is ``in_flight`` when Annie
    starts); returns what it did after each frame: "turn", "reset" or None, and its results."""
    strategy = TranscriptTurnStartStrategy(stt_in_flight=lambda: in_flight)
    did: list[str | None] = []

    @strategy.event_handler("on_user_turn_started")
    async def _started(_strategy, _params):
        did[-1] = "turn"

    @strategy.event_handler("on_reset_aggregation")
    async def _reset(_strategy):
        did[-1] = "reset"

    results = []
    for frame in frames:
        did.append(None)
        results.append(await strategy.process_frame(frame))
    return did, results


def test_the_tail_of_the_answered_turn_is_dropped_not_an_interruption():
    did, results = asyncio.run(drive([BotStartedSpeakingFrame(), final("the day.")], in_flight=True))
    assert did == [None, "reset"]
    assert results[-1] == ProcessFrameResult.STOP


def test_with_nothing_in_flight_a_transcript_over_annie_interrupts_as_before():
    did, _ = asyncio.run(drive([BotStartedSpeakingFrame(), final("the day.")], in_flight=False))
    assert did == [None, "turn"]


@pytest.mark.parametrize("frames, expected", [
    pytest.param([BotStartedSpeakingFrame(), final("the day."), final("stop please")], [None, "reset", "turn"],
                 id="after the tail, the next transcript interrupts"),
    pytest.param([BotStartedSpeakingFrame(), VADUserStartedSpeakingFrame(), VADUserStoppedSpeakingFrame(),
                  final("stop please")], [None, None, None, "turn"],
                 id="the caller's own utterance over Annie interrupts"),
    pytest.param([BotStartedSpeakingFrame(), InterimTranscriptionFrame("the", "caller", "t"), final("the day.")],
                 [None, "reset", "reset"], id="partials of the tail too"),
    pytest.param([BotStartedSpeakingFrame(), BotStoppedSpeakingFrame(), final("the day.")], [None, None, "turn"],
                 id="once Annie is done, the tail opens a turn and is answered"),
])
def test_the_strategy_follows_the_rule(frames, expected):
    did, _ = asyncio.run(drive(frames, in_flight=True))
    assert did == expected


# --- the call: the agent's pipeline, a segmented STT slower than real time, the LLM stand-in server

HEAD, TAIL = "What is the weather like?", "the day."


@pytest.fixture
async def llm():
    from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions

    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.02)) as server:
        server.queue_reply("Sunny and warm, with a light breeze over hills and fields.")
        yield server


@pytest.mark.parametrize("partials", [True, False], ids=["pause-first", "no-partials"])
@pytest.mark.parametrize("tells", [True, False], ids=["stt-tells", "stt-cannot-tell"])
async def test_a_split_question_s_late_tail_does_not_cut_annie_off(make_settings, llm, partials, tells):
    """The VAD splits the question; each part's final comes 1.2 s after its VAD stop; the turn
    ends on the head's and Annie answers; the tail's final comes while she speaks. An STT that says
    it has audio in flight keeps her talking; one that cannot tell is judged as before (the tail
    interrupts her: the case the rule exists for, and proof that this test can fail)."""
    from pipecat.frames.frames import BotStartedSpeakingFrame, InterruptionFrame

    from agent.demo.call import running_call
    from tests.doubles import SlowFinalSTT, ToneTTSService

    settings = make_settings(enable_barge_in=True)
    tts = ToneTTSService(ms_per_char=50)  # the answer lasts ~2.5 s
    # the tail's final lands 0.4 s into her answer even when a busy machine makes her late (a CI
    # run: she began 2.4 s after the tail's VAD stop, the tail came before her and was a turn)
    stt = SlowFinalSTT([HEAD, TAIL], delay_s=1.2, tells=tells, after_annie_s=0.4)
    async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt=stt, stt_streams_partials=partials) as call:
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await asyncio.sleep(0.8)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await asyncio.sleep(0.3)
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await asyncio.sleep(0.3)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await llm.wait_for(lambda: len(llm.requests) >= 1, timeout=8)
        await call.wait_until(lambda: stt._in_flight == 0, 5, "the tail's final")
        await asyncio.sleep(0.5)
        started = call.log.times(BotStartedSpeakingFrame)
        assert len(stt.sent_at) == 2 and started and started[0] < stt.sent_at[1] < started[0] + 1.0, \
            "Annie was answering when the tail came (else the case is moot)"
        cut = [t for t in call.log.times(InterruptionFrame) if t > started[0]]
        assert [m["content"] for r in llm.requests[:1] for m in r.messages if m["role"] == "user"] == [HEAD]
        if tells:
            assert cut == [], "the tail of the question she is answering cut Annie off"
            assert len(llm.requests) == 1, "the tail was answered as a turn of its own"
        else:
            assert cut, "an STT that cannot tell: the tail is judged as before, and interrupts"

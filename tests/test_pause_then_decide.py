"""Pause first, then decide: commit on real words, resume on noise, backchannels and echo.

The pipeline is the agent's, with barge-in on and a streaming-STT pipeline (partials), the LLM
is the stand-in server, the loudspeaker is the simulated sink that records every sample played.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import numpy as np
import pytest
from pipecat.frames.frames import (
    InterimTranscriptionFrame,
    InterruptionFrame,
    TranscriptionFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)

from pipecat.processors.filters.identity_filter import IdentityFilter

from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions
from agent.demo.call import running_call
from processors.stt_in_flight import mark_segment
from tests.doubles import ToneTTSService

REPLY = "Once upon a time. There was a little village by the sea, where fishermen lived. The end."


def interim(text: str) -> InterimTranscriptionFrame:
    return InterimTranscriptionFrame(text=text, user_id="caller", timestamp="")


def final(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text=text, user_id="caller", timestamp="", finalized=True)


@pytest.fixture
async def llm():
    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.05)) as server:
        server.queue_reply(REPLY)
        server.queue_reply("All right.")
        yield server


@pytest.fixture
def settings(make_settings):
    return make_settings(enable_barge_in=True, barge_in_decide_ms=600)


def nonzero(pcm: bytes | np.ndarray) -> np.ndarray:
    samples = np.frombuffer(bytes(pcm), dtype=np.int16) if not isinstance(pcm, np.ndarray) else pcm
    return samples[samples != 0]


async def annie_speaking(call):
    await call.caller_says("tell me a story")
    await call.wait_speaking()
    await asyncio.sleep(0.8)


def interruptions_after(call, t: float) -> list[float]:
    return [x for x in call.log.times(InterruptionFrame) if x >= t]


async def test_real_words_commit_the_interruption(settings, llm):
    tts = ToneTTSService()
    async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt_streams_partials=True) as call:
        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await call.wait_until(lambda: call.loudspeaker.pauses, 1, "the pause")
        paused_at = call.loudspeaker.pauses[0][0]
        assert paused_at - onset < 0.05, "playback must pause at the caller's first sound"
        assert call.audible_since(paused_at + 0.01) == 0.0
        assert not interruptions_after(call, onset), "nothing is cancelled before the decision"

        await call.send(interim("wait"))
        await call.wait_until(lambda: interruptions_after(call, onset), 1, "the committed interruption")
        await asyncio.sleep(0.3)
        await call.send(final("wait what was that"), VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await llm.wait_for(lambda: len(llm.requests) == 2, timeout=5)
        assert llm.requests[1].messages[-1] == {"role": "user", "content": "wait what was that"}
        assert llm.requests[0].disconnected_at is not None or llm.requests[0].completed
        assert call.call.pause_first.decisions[0][0] == "commit"


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([], id="noise-no-words"),
        pytest.param([interim("mm"), final("Mm-hm.")], id="backchannel"),
        pytest.param([interim("M-M"), final("M-M-H-M.")], id="backchannel-as-whisper-spells-it"),
        pytest.param([interim("MME."), final("Mmm.")], id="hum-as-whisper-spells-it"),
        pytest.param([interim("okay"), final("Okay, yeah.")], id="backchannel-phrase"),
        pytest.param([interim("once upon"), final("Once upon a time.")], id="echo-of-annie"),
    ],
)
async def test_no_real_words_resume_annie_with_nothing_lost_or_repeated(settings, llm, frames):
    tts = ToneTTSService()
    async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt_streams_partials=True) as call:
        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        for frame in frames:
            await asyncio.sleep(0.1)
            await call.send(frame)
        await asyncio.sleep(0.15)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await call.wait_until(lambda: call.loudspeaker.pauses and call.loudspeaker.pauses[0][1], 3, "the resume")
        await call.wait_silent(quiet_s=1.0)

        assert not interruptions_after(call, onset)
        paused, resumed = call.loudspeaker.pauses[0]
        assert call.audible_since(paused + 0.01) - call.audible_since(resumed) < 0.011, "silent while paused"
        assert " ".join(tts.requests).split() == REPLY.split(), "the reply was kept whole"
        played = nonzero(call.loudspeaker.audio())
        produced = nonzero(tts.produced)
        assert played.size == produced.size and np.array_equal(played, produced), "audio lost or repeated"

        await asyncio.sleep(0.5)
        assert len(llm.requests) == 1, "no answer to a backchannel or noise"
        await call.caller_says("and then what")
        await llm.wait_for(lambda: len(llm.requests) == 2, timeout=5)
        users = [m["content"] for m in llm.requests[1].messages if m["role"] == "user"]
        assert users == ["tell me a story", "and then what"], "the backchannel must not reach the context"
        (decision, after_s), = call.call.pause_first.decisions
        assert decision == "resume" and after_s < 0.6 + 0.3, "resumed by the end of the window"


async def test_a_caller_who_keeps_talking_wins(settings, llm):
    async with running_call(settings, llm_base_url=llm.base_url, tts=ToneTTSService(), stt_streams_partials=True) as call:
        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        # Speech goes on past the 600 ms window and the STT has no words yet.
        await call.wait_until(lambda: interruptions_after(call, onset), 2, "the interruption")
        committed = min(interruptions_after(call, onset))
        assert 0.5 < committed - onset < 0.9
        await call.send(final("I really need to tell you something"), VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await llm.wait_for(lambda: len(llm.requests) == 2, timeout=5)
        assert llm.requests[1].messages[-1]["content"] == "I really need to tell you something"


async def test_falls_back_to_cancel_on_speech_without_partials(settings, llm):
    async with running_call(settings, llm_base_url=llm.base_url, tts=ToneTTSService(), stt_streams_partials=False) as call:
        assert call.call.pause_first is None
        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await call.wait_until(lambda: interruptions_after(call, onset), 1, "the immediate interruption")
        assert not call.loudspeaker.pauses


async def test_a_late_final_after_a_resume_does_not_cut_annie_off(settings, llm):
    """The decision on an utterance stands: its slow final transcript does not commit it later."""
    tts = ToneTTSService()
    async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt_streams_partials=True) as call:
        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await asyncio.sleep(0.2)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await call.wait_until(lambda: call.loudspeaker.pauses and call.loudspeaker.pauses[0][1], 3, "the resume")
        await call.send(final("and then I can"))  # what a slow STT finally made of that cough
        await call.wait_silent(quiet_s=1.0)
        assert not interruptions_after(call, onset)
        assert " ".join(tts.requests).split() == REPLY.split()
        await call.caller_says("what next")
        await llm.wait_for(lambda: len(llm.requests) == 2, timeout=5)
        users = [m["content"] for m in llm.requests[1].messages if m["role"] == "user"]
        assert users == ["tell me a story", "what next"]


async def pause_and_resume(settings, frames) -> float:
    """Annie speaks; the caller's VAD starts, ``frames`` follow, the VAD stops; seconds from the
    pause to the resume decision."""
    async with (
        LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.05)) as llm,
        running_call(settings, llm_base_url=llm.base_url, tts=ToneTTSService(), stt_streams_partials=True) as call,
    ):
        llm.queue_reply(REPLY)
        await annie_speaking(call)
        # The sound is over right after the pause (as Annie's echo is). The VAD frames are system
        # frames and overtake queued transcripts, so the stop goes in once the words are through.
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.064), *frames)
        await asyncio.sleep(0.1)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await call.wait_until(lambda: call.loudspeaker.pauses and call.loudspeaker.pauses[0][1], 5, "the resume")
        (decision, after_s), = call.call.pause_first.decisions
        assert decision == "resume"
        return after_s


async def test_a_blip_that_ends_with_the_pause_resumes_at_once(make_settings):
    """Annie's own echo stops when she pauses: with no words, or only her own words (the STT
    transcribing her echo), the resume does not wait for a final transcript; a sound with other
    words still does (and none waits for the 3 s window)."""
    settings = make_settings(enable_barge_in=True, barge_in_decide_ms=3000, barge_in_resume_quiet_ms=100)
    blip = await pause_and_resume(settings, [])
    echo = await pause_and_resume(settings, [interim("once upon a")])
    hum = await pause_and_resume(settings, [interim("mm")])
    # The VAD stop comes 0.1 s after the pause (as sent: within a 20 ms tick once through the
    # pipeline's queues), the resume after 0.1 s of quiet; a hum waits for its final (0.5 s).
    assert 0.18 <= min(blip, echo) and max(blip, echo) < 0.4 < hum < 2.5


@pytest.mark.parametrize(
    "first_s, gap_s",
    [
        pytest.param(0.1, 0.2, id="gap-after-a-blip"),  # "Wait, ... stop please": a blip, then more
        pytest.param(0.5, 0.2, id="gap-at-the-window-end"),  # the window ends during the gap
    ],
)
async def test_a_caller_who_pauses_at_a_comma_is_not_talked_over(make_settings, llm, first_s, gap_s):
    """The caller's first word ends (VAD stop) and the voice comes back within the quiet hold:
    Annie stays paused throughout, and the caller, still talking, wins at the window's end."""
    settings = make_settings(enable_barge_in=True, barge_in_decide_ms=600, barge_in_resume_quiet_ms=300)
    async with running_call(settings, llm_base_url=llm.base_url, tts=ToneTTSService(), stt_streams_partials=True) as call:
        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.064))
        await asyncio.sleep(first_s)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await asyncio.sleep(gap_s)
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.064))
        await call.wait_until(lambda: interruptions_after(call, onset), 2, "the interruption")
        committed = min(interruptions_after(call, onset))
        assert [d for d, _ in call.call.pause_first.decisions] == ["commit"], "resumed over the caller"
        assert len(call.loudspeaker.pauses) == 1, "paused once, never resumed in between"
        assert call.audible_since(call.loudspeaker.pauses[0][0] + 0.01) == 0.0
        assert committed - onset < max(0.6, first_s + gap_s) + 0.15, "by the window's end or the voice's return"
        await call.send(final("wait stop please what time is it"), VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await llm.wait_for(lambda: len(llm.requests) == 2, timeout=5)
        assert llm.requests[1].messages[-1]["content"] == "wait stop please what time is it"


async def test_pause_first_makes_the_vad_start_sooner(make_settings):
    """With pause-then-decide engaged the VAD gets the short start and no loudness gate; with the
    plain cancel barge-in it keeps its own parameters."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams

    from agent.pipeline import build_call_pipeline
    from agent.services import build_vad
    from pipecat.processors.filters.identity_filter import IdentityFilter
    from transports.rig.simulated import SimulatedPhoneTransport

    settings = make_settings(enable_barge_in=True, barge_in_vad_start_ms=64, barge_in_vad_min_volume=0.0,
                             barge_in_vad_confidence=0.5)
    for partials, expected in ((True, (0.064, 0.0, 0.5)), (False, (0.2, VADParams().min_volume, settings.vad_confidence))):
        vad = build_vad(settings)
        assert isinstance(vad, SileroVADAnalyzer)
        call = build_call_pipeline(settings, transport=SimulatedPhoneTransport(), stt=IdentityFilter(),
                                   llm=IdentityFilter(), tts=IdentityFilter(), vad_analyzer=vad,
                                   stt_streams_partials=partials)
        assert (call.pause_first is not None) == partials
        vad.set_sample_rate(16000)  # as the pipeline does at start: the tuned parameters stay
        assert (vad.params.start_secs, vad.params.min_volume, vad.params.confidence) == expected


def test_the_tuned_vad_hears_a_word_onset_sooner():
    """On real speech after silence, the tuned parameters reach "speaking" earlier in the audio than
    pipecat's defaults (the loudness gate's 400 ms window and smoothing hold those back)."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams, VADState

    from agent.bargein.strategy import tune_vad_for_pause_first
    from transports.rig.audio import synth_speech

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (Debian espeak-ng): no speech to test the VAD on")
    speech = synth_speech("Wait, stop please. What time is it?", 16000)
    audio = np.concatenate([np.zeros(16000, np.int16), (speech * 0.1).astype(np.int16)])

    def start_sample(vad) -> int:
        vad.set_sample_rate(16000)
        for i in range(0, len(audio) - 320, 320):
            if vad._run_analyzer(audio[i : i + 320].tobytes()) == VADState.SPEAKING:
                return i + 320
        raise AssertionError("the VAD never heard the speech")

    default = start_sample(SileroVADAnalyzer(sample_rate=16000, params=VADParams()))
    tuned_vad = SileroVADAnalyzer(sample_rate=16000, params=VADParams())
    tune_vad_for_pause_first(tuned_vad, start_ms=64, min_volume=0.0, sample_rate=16000)
    tuned = start_sample(tuned_vad)
    assert 16000 <= tuned < default


async def test_a_late_final_during_the_next_pause_is_not_taken_for_its_words(lasting, llm):
    """Annie's echo: a resumed utterance, then another one starts before the STT's final of the
    first arrives. That final (every backend here finalizes on a VAD stop) is the first one's:
    it must not commit the second pause."""
    async with running_call(lasting, llm_base_url=llm.base_url, tts=ToneTTSService(), stt_streams_partials=True) as call:
        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.064), VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await call.wait_until(lambda: call.loudspeaker.pauses and call.loudspeaker.pauses[0][1], 3, "the first resume")
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.064))
        await call.wait_until(lambda: len(call.loudspeaker.pauses) == 2, 1, "the second pause")
        await call.send(final("tree was going to make him"))  # Whisper's late take on the first one
        await asyncio.sleep(0.2)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await call.wait_until(lambda: call.loudspeaker.pauses[1][1], 3, "the second resume")
        await call.wait_silent(quiet_s=1.0)
        assert not interruptions_after(call, onset)
        assert [d for d, _ in call.call.pause_first.decisions] == ["resume", "resume"]


class CountingSTT(IdentityFilter):
    """Lets frames through and says how many segments it has been handed (``segments_ended``), as
    the segmented STTs do (processors/stt_in_flight.py); the test sets the count."""

    segments_ended = 0


@pytest.mark.parametrize("segment, decision", [(2, "resume"), (4, "commit")])
async def test_a_slow_stts_final_of_an_earlier_segment_is_not_the_pauses_words(lasting, llm, segment, decision):
    """A busy machine's Whisper still owes finals of the caller's interruption when her "okay"
    pauses Annie (the bench's full run, 2026-12-07: "Stop clean. What time in it?" committed an
    "okay"). The STT marks each final with its segment: one from before the pause (2 of the 3 it
    had) is not the okay's words, and Annie resumes; the okay's own final (4) is judged as ever."""
    stt = CountingSTT()
    async with running_call(lasting, llm_base_url=llm.base_url, tts=ToneTTSService(), stt=stt,
                            stt_streams_partials=True) as call:
        await annie_speaking(call)
        stt.segments_ended = 3
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.064))
        await call.wait_until(lambda: call.loudspeaker.pauses, 1, "the pause")
        await asyncio.sleep(0.4)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        stt.segments_ended = 4
        await call.send(mark_segment(final("stop clean what time in it"), segment))
        if decision == "resume":
            await call.wait_until(lambda: call.loudspeaker.pauses[0][1], 3, "the resume")
            await asyncio.sleep(0.3)
            assert not interruptions_after(call, onset)
        else:
            await call.wait_until(lambda: interruptions_after(call, onset), 3, "the committed interruption")
        assert [d for d, _ in call.call.pause_first.decisions] == [decision]


@pytest.fixture
def lasting(make_settings):
    """Settings for calls whose sound must end inside the window: a 1 s window, so that a 0.5 s
    sound ends inside it with 0.5 s to spare. With the 600 ms of ``settings`` a late VAD stop (two
    full runs in three: a pause of the event loop late in the suite, never alone) left the caller
    speaking at the window's end, which commits ("kept talking"), as it should for a caller who
    kept talking. The late-final test too (a full run, 2026-12-07: a 0.2 s sound committed)."""
    return make_settings(enable_barge_in=True, barge_in_decide_ms=1000)


async def resumed_after_a_lasting_sound(call) -> float:
    """Annie speaks; the caller's voice lasts 0.5 s (no blip) with no words in time: resumed."""
    await annie_speaking(call)
    onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.064))
    await asyncio.sleep(0.5)
    await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
    await call.wait_until(lambda: call.loudspeaker.pauses and call.loudspeaker.pauses[0][1], 3, "the resume")
    assert [d for d, _ in call.call.pause_first.decisions] == ["resume"]
    return onset


async def test_real_words_that_come_after_the_resume_still_interrupt(lasting, llm):
    """A busy machine: the VAD stop outran the transcript, so Annie resumed. The caller's words,
    when they arrive, commit the interruption then and are answered; the question is not lost."""
    async with running_call(lasting, llm_base_url=llm.base_url, tts=ToneTTSService(), stt_streams_partials=True) as call:
        onset = await resumed_after_a_lasting_sound(call)
        await asyncio.sleep(0.2)
        await call.send(final("stop call my daughter"))
        await call.wait_until(lambda: interruptions_after(call, onset), 3, "the late interruption")
        await llm.wait_for(lambda: len(llm.requests) == 2, timeout=5)
        users = [m["content"] for m in llm.requests[1].messages if m["role"] == "user"]
        assert users[-1] == "stop call my daughter"
        assert [d for d, _ in call.call.pause_first.decisions] == ["resume", "commit late"]


@pytest.mark.parametrize("late", [
    pytest.param("mm-hm okay", id="backchannel"),
    pytest.param("once upon a time", id="echo"),
])
async def test_a_late_backchannel_or_echo_after_the_resume_does_not_interrupt(lasting, llm, late):
    tts = ToneTTSService()
    async with running_call(lasting, llm_base_url=llm.base_url, tts=tts, stt_streams_partials=True) as call:
        onset = await resumed_after_a_lasting_sound(call)
        await call.send(final(late))
        await call.wait_silent(quiet_s=1.0)
        assert not interruptions_after(call, onset)
        assert " ".join(tts.requests).split() == REPLY.split()
        assert len(llm.requests) == 1


@pytest.mark.parametrize(
    "late",
    [
        pytest.param([interim("I see"), final("I see.")], id="interim-then-final"),
        pytest.param([final("I see."), interim("I see")], id="final-then-stray-interim"),
        pytest.param([interim("yeah"), interim("yeah okay"), final("Yeah, okay.")], id="several-partials"),
    ],
)
async def test_late_words_of_a_resumed_backchannel_never_open_a_turn_once_annie_is_done(lasting, llm, late):
    """A slow STT: the caller's "I see" was resumed on, and its partials and final trickle in one by
    one after Annie finished her reply. None of them opens a caller turn (a turn opened by a partial
    has no text and hangs until pipecat's 5 s stop watchdog, deaf to the caller's next question),
    and the caller's next question is answered at once."""
    tts = ToneTTSService()
    async with running_call(lasting, llm_base_url=llm.base_url, tts=tts, stt_streams_partials=True) as call:
        onset = await resumed_after_a_lasting_sound(call)
        await call.wait_silent(quiet_s=0.5)
        for frame in late:
            await call.send(frame)
            await asyncio.sleep(0.15)
        await asyncio.sleep(0.5)
        assert not interruptions_after(call, onset), "a late backchannel opened a turn"
        assert len(llm.requests) == 1
        asked = await call.caller_says("what next")
        await llm.wait_for(lambda: len(llm.requests) == 2, timeout=3)
        assert time.monotonic() - asked < 2.0, "the question waited for a stray turn to time out"
        users = [m["content"] for m in llm.requests[1].messages if m["role"] == "user"]
        assert users == ["tell me a story", "what next"]


async def test_a_committed_interruption_without_words_is_asked_to_repeat_once(make_settings, llm):
    """The caller kept talking past the window, so Annie stopped mid-story, but the STT gave no words
    (a muffled voice, a lost transcript). Annie does not leave the caller in silence: she asks them
    to repeat, once, without running the LLM; what the caller then says is answered as usual. An
    empty turn that did not cut her off (a sound while she was idle) still gets no answer."""
    settings = make_settings(enable_barge_in=True, barge_in_decide_ms=600, user_turn_stop_timeout_ms=1500,
                             repeat_request_text="Sorry, what was that?")
    tts = ToneTTSService()
    async with running_call(settings, llm_base_url=llm.base_url, tts=tts, stt_streams_partials=True) as call:
        # A sound while Annie is idle, no words: a turn that ends empty, and no answer.
        await call.send(VADUserStartedSpeakingFrame(start_secs=0.064))
        await asyncio.sleep(0.3)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await call.wait_until(lambda: call.log.times(UserStoppedSpeakingFrame), 8, "the empty idle turn to end")
        await asyncio.sleep(0.3)
        assert tts.requests == [] and llm.requests == []

        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
        await call.wait_until(lambda: interruptions_after(call, onset), 2, "the interruption (kept talking)")
        await asyncio.sleep(0.2)
        await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await call.wait_until(lambda: "Sorry, what was that?" in tts.requests, 8, "the request to repeat")
        asked = time.monotonic()
        await call.wait_until(lambda: call.audible_since(asked) > 0.2, 3, "Annie to ask out loud")
        assert len(llm.requests) == 1, "the LLM is not run for the request to repeat"
        assert tts.requests.count("Sorry, what was that?") == 1

        await call.wait_silent(quiet_s=0.5)
        await call.caller_says("what next")
        await llm.wait_for(lambda: len(llm.requests) == 2, timeout=5)
        messages = llm.requests[1].messages
        assert messages[-1] == {"role": "user", "content": "what next"}
        assert any(m["role"] == "assistant" and "Sorry, what was that?" in m["content"] for m in messages)


@pytest.mark.parametrize(
    "late_final, decision",
    [
        pytest.param("stop, call my daughter", "commit", id="words-come-late"),
        pytest.param("Mm-hm.", "resume", id="backchannel-comes-late"),
        pytest.param(None, "resume", id="no-final"),
    ],
)
async def test_a_long_sound_without_words_waits_for_its_final(make_settings, llm, late_final, decision):
    """The caller spoke for ~0.9 s inside the window and the STT had no words yet (a slow final on
    a busy machine): Annie stays paused past the window until the final. Real words commit without
    a resume in between; a backchannel resumes as soon as it is in; no final resumes after the wait."""
    settings = make_settings(enable_barge_in=True, barge_in_decide_ms=1300, barge_in_resume_quiet_ms=300)
    async with running_call(settings, llm_base_url=llm.base_url, tts=ToneTTSService(), stt_streams_partials=True) as call:
        await annie_speaking(call)
        onset = await call.send(VADUserStartedSpeakingFrame(start_secs=0.064))
        await asyncio.sleep(0.9)
        stopped = await call.send(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        await asyncio.sleep(0.8)  # past the window (1.3 s from the pause) and the 0.5 s grace
        assert call.call.pause_first.decisions == [], "decided before the final transcript"
        if late_final is not None:
            arrived = await call.send(final(late_final))
        pause_first = call.call.pause_first
        await call.wait_until(lambda: pause_first.decisions, 2, "the decision")
        (made, _), = pause_first.decisions
        assert made == decision
        if decision == "commit":
            await call.wait_until(lambda: interruptions_after(call, onset), 1, "the interruption")
            assert len(call.loudspeaker.pauses) == 1
            assert call.audible_since(call.loudspeaker.pauses[0][0] + 0.01) == 0.0, "resumed over the caller"
        else:
            await call.wait_until(lambda: call.loudspeaker.pauses and call.loudspeaker.pauses[0][1], 2, "the resume")
            resumed = call.loudspeaker.pauses[0][1]
            if late_final is None:
                assert 1.0 < resumed - stopped < 1.5, "resumed after the wait for a final (1.2 s)"
            else:
                assert resumed - arrived < 0.25, "a backchannel final resumes at once"
            await asyncio.sleep(0.3)
            assert not interruptions_after(call, onset)

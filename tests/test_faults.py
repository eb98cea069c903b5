"""Faults mid-call: the LLM or the speech server killed, hanging or talking nonsense.

The assembled call pipeline runs on the simulated phone line with the real Gemma and Chatterbox
services talking HTTP to the stand-in servers. Where the fault is "the server process died",
the stand-in runs in a child process and is killed with SIGKILL (or frozen with SIGSTOP), then
started again on the same port, as systemd would. Caller turns are injected as VAD and
transcription frames (``agent.demo.call``); what the caller heard is the simulated
loudspeaker's recording.

After every fault the call must be left in a usable state: nothing crashed, the "speaking"
state is clear, no half-duplex mute is left on, and the caller's next turn is answered out loud.
TTS faults run in both barge-in modes. Recovery times are printed (``pytest -s``); they go in
bench/FAULTS.md, never in assertions.

The module also holds :func:`fault_call` and :class:`ChildServer`, which the other
``test_faults_*`` files import.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ErrorFrame,
    TTSTextFrame,
    UserMuteStartedFrame,
    UserMuteStoppedFrame,
)
from pipecat.processors.frame_processor import FrameProcessor

from agent.config import AgentSettings
from agent.services import build_tts
from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions
from agent.demo.standins.tts_server import TTSStandIn, TTSStandInOptions
from agent.status import CallStatus, StatusObserver
from agent.demo.call import CallHarness, running_call
from tests.doubles import ToneTTSService

REPO = Path(__file__).resolve().parent.parent
BOTH_MODES = pytest.mark.parametrize("barge_in", [False, True], ids=["half-duplex", "barge-in"])
# Random bytes played as 16-bit audio have an RMS near 18,900; espeak speech stays far below.
NOISE_RMS = 12000.0


# ----- shared helpers (imported by the other test_faults_* files) ---------------------------------


@dataclass
class FaultCall(CallHarness):
    """A running call plus what the operator would see: status, warnings and errors in the log."""

    status: CallStatus = field(default=None)  # type: ignore[assignment]
    log_lines: list[str] = field(default_factory=list)

    def __init__(self, call, transport, log, tts, status: CallStatus, log_lines: list[str]):
        super().__init__(call, transport, log, tts)
        self.status = status
        self.log_lines = log_lines

    def errors(self, since: float = 0.0) -> list[ErrorFrame]:
        return [f for t, f, _ in self.log.events if isinstance(f, ErrorFrame) and t >= since]

    def mute_left_on(self) -> bool:
        """Whether the last half-duplex mute the user aggregator broadcast is still on."""
        started = self.log.times(UserMuteStartedFrame)
        stopped = self.log.times(UserMuteStoppedFrame)
        return bool(started) and (not stopped or stopped[-1] < started[-1])

    def bot_started_after(self, t: float) -> float | None:
        later = [s for s in self.log.times(BotStartedSpeakingFrame) if s > t]
        return min(later) if later else None

    def heard_text_at(self, words: str, since: float = 0.0) -> float | None:
        """When text containing ``words`` started to play at the loudspeaker (its TTSTextFrame)."""
        for t, frame, source in self.log.events:
            if t >= since and isinstance(frame, TTSTextFrame) and words in frame.text and "Loudspeaker" in source:
                return t
        return None

    def loudest_rms_since(self, t: float) -> float:
        return max((c.rms for c in list(self.loudspeaker.played) if c.t + c.duration > t), default=0.0)

    async def settle(self, quiet_s: float = 0.8, timeout: float = 30.0) -> None:
        """Wait until Annie is silent and the pipeline agrees she stopped speaking."""
        await self.wait_silent(quiet_s=quiet_s, timeout=timeout)
        await self.wait_until(lambda: not self.status.bot_speaking, timeout, "the speaking state to clear")
        await self.wait_until(lambda: not self.mute_left_on(), 5, "the half-duplex mute to lift")

    async def wait_idle(self, llm_server=None, *, quiet_s: float = 1.0, timeout: float = 60.0) -> None:
        """Wait until the call has been idle for ``quiet_s`` in a row: no caller turn open (a turn
        stays open until its transcript, or the turn-stop timeout), Annie not speaking, the
        half-duplex mute lifted and, given the LLM stand-in, every request to it finished.

        Unlike :meth:`settle`, this also waits for a turn that Annie has not answered yet.
        """

        def idle() -> bool:
            return (
                not self.status.user_speaking and not self.status.bot_speaking and not self.mute_left_on()
                and (llm_server is None or all(
                    r.finished_at is not None or r.disconnected_at is not None for r in llm_server.requests
                ))
            )

        deadline, quiet_since = time.monotonic() + timeout, None
        while True:
            now = time.monotonic()
            if not idle():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return
            if now > deadline:
                raise AssertionError(f"the call was not idle for {quiet_s} s within {timeout} s")
            await asyncio.sleep(0.02)

    async def assert_next_turn_answered(self, text: str, *, timeout: float = 15.0) -> float:
        """The caller says ``text``; Annie must answer out loud. Returns the answer's latency."""
        await self.settle()
        before = time.monotonic()
        await self.caller_says(text)
        said = time.monotonic()
        await self.wait_until(lambda: self.bot_started_after(said) is not None, timeout, f"an answer to {text!r}")
        await self.wait_until(lambda: self.audible_since(said) > 0.3, timeout, "the answer to be audible")
        return self.bot_started_after(said) - before  # type: ignore[operator]


@asynccontextmanager
async def fault_call(settings: AgentSettings, *, llm_base_url: str, tts: FrameProcessor, **kwargs):
    """:func:`agent.demo.call.running_call` plus what the operator sees: a :class:`FaultCall` with
    the status endpoint's state and the WARNING-and-above log lines. ``kwargs`` as running_call's."""
    status = CallStatus.from_settings(settings, model_loaded=True)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        async with running_call(settings, llm_base_url=llm_base_url, tts=tts,
                                observers=[StatusObserver(status)], **kwargs) as call:
            yield FaultCall(call.call, call.transport, call.log, tts, status, lines)
    finally:
        logger.remove(sink)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildServer:
    """A stand-in server in a child process on a fixed port, to kill, freeze and start again.

    ``module`` is ``agent.demo.standins.llm_server`` or ``agent.demo.standins.tts_server``; both print one
    line with their URL when they listen.
    """

    def __init__(self, module: str, *args: str, port: int | None = None):
        self.module = module
        self.args = list(args)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> ChildServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "--port", str(self.port), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"http://\S+", line)
        if not match:
            self.stop()
            raise RuntimeError(f"{self.module} did not start: {line!r}")
        self.url = match.group(0)
        return self

    async def start_async(self) -> ChildServer:
        return await asyncio.to_thread(self.start)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, its sockets are closed by the kernel."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def __enter__(self) -> ChildServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def report(fault: str, **figures: float | str) -> None:
    """One line per fault for bench/FAULTS.md (shown with ``pytest -s``)."""
    shown = ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    print(f"\nFAULT {fault}: {shown}", flush=True)


# ----- the LLM server ---------------------------------------------------------------------------


async def test_llm_killed_mid_stream_then_down_for_a_turn_then_back(make_settings):
    """SIGKILL the LLM server while Annie speaks her answer; keep it down a turn; start it again."""
    settings = make_settings(enable_barge_in=False, llm_timeout_s=2.0)
    tts = ToneTTSService()
    # 0.25 s per token: the reply is still streaming after its first sentence is spoken.
    server = ChildServer("agent.demo.standins.llm_server", "--token-delay", "0.25")
    await server.start_async()
    try:
        async with fault_call(settings, llm_base_url=server.url, tts=tts) as call:
            await call.caller_says("hello Annie")
            await call.wait_speaking()
            assert tts.requests == ["Of course."], tts.requests  # the rest was still streaming
            killed = time.monotonic()
            await asyncio.to_thread(server.kill)

            # The caller hears a short apology in place of the rest, then silence; the call goes on.
            await call.wait_until(lambda: "Sorry" in " ".join(tts.requests), 10, "the apology")
            apology_at = await call.wait_until(lambda: call.heard_text_at("Sorry") is not None, 10, "the apology")
            apology_at = call.heard_text_at("Sorry")
            assert call.errors(killed), "the failure was not reported as an ErrorFrame"
            assert not [e for e in call.errors(killed) if e.fatal]
            assert any("speaking an apology" in line for line in call.log_lines)
            assert not any("I heard you say" in r for r in tts.requests)

            # Down for a whole turn: an apology again, promptly.
            before = len(tts.requests)
            down_latency = await call.assert_next_turn_answered("are you there")
            await call.wait_until(lambda: settings.apology_text in " ".join(tts.requests[before:]), 10, "an apology")

            # Back on the same port: the next turn is answered normally.
            await server.start_async()
            latency = await call.assert_next_turn_answered("now can you hear me")
            await call.wait_until(lambda: "I heard you say: now can you hear me." in tts.requests, 10, "the answer")
            await call.settle()
        report(
            "LLM killed mid-stream", kill_to_apology_audible=apology_at - killed,
            turn_while_down_to_apology=down_latency, turn_after_restart_to_answer=latency,
        )
    finally:
        server.stop()


async def test_apology_after_a_dropped_stream_is_not_joined_to_a_broken_sentence(make_settings, llm_server):
    settings = make_settings(enable_barge_in=False, llm_timeout_s=1.0)
    llm_server.fault = "drop"  # the stand-in closes the connection after "Of course. I "
    tts = ToneTTSService()
    async with fault_call(settings, llm_base_url=llm_server.base_url, tts=tts) as call:
        await call.caller_says("hello")
        await call.wait_until(lambda: "Sorry" in " ".join(tts.requests), 10, "the apology")
        await call.settle()
    apology = next(r for r in tts.requests if "Sorry" in r)
    assert apology.strip().startswith("Sorry"), f"the caller heard {apology!r}"


# ----- the speech server ------------------------------------------------------------------------


REPLY = "Of course. The garden looks lovely in the morning sun today. Shall I read you the news now?"
SHORT_REPLY = "Of course. The garden looks lovely."
ANSWER = "Yes, I am here."


@pytest.fixture
async def llm():
    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.01)) as server:
        yield server


def spoken(server_requests) -> list[str]:
    return [r.body.get("input", "") for r in server_requests]


@BOTH_MODES
async def test_tts_killed_mid_utterance(make_settings, llm, barge_in):
    settings = make_settings(enable_barge_in=barge_in, chatterbox_first_byte_timeout_s=1.0)
    llm.queue_reply(REPLY)
    llm.queue_reply(ANSWER)
    # Synthesis at 1.2x real time: the long second sentence is still streaming when it is killed.
    speech = ChildServer("agent.demo.standins.tts_server", "--realtime-factor", "1.2")
    await speech.start_async()
    try:
        tts = build_tts(settings, base_url=speech.url)
        async with fault_call(settings, llm_base_url=llm.base_url, tts=tts) as call:
            await call.caller_says("how is the garden")
            await call.wait_speaking()
            await asyncio.sleep(1.5)
            assert call.status.bot_speaking
            killed = time.monotonic()
            await asyncio.to_thread(speech.kill)

            # Annie falls silent (the rest of the reply cannot be synthesised) and says so in the log.
            silent_at = await call.wait_silent(quiet_s=0.5)
            await call.settle()
            stopped = call.log.times(BotStoppedSpeakingFrame)[-1]
            errors = call.errors(killed)
            assert errors and not [e for e in errors if e.fatal], "no non-fatal ErrorFrame for the dead server"
            assert any("Chatterbox" in line for line in call.log_lines)

            await speech.start_async()
            latency = await call.assert_next_turn_answered("hello again")
            await call.settle()
            assert user_turns(llm)[-1] == "hello again"
        report(
            f"TTS killed mid-utterance ({'barge-in' if barge_in else 'half-duplex'})",
            kill_to_silence=silent_at - killed, kill_to_speaking_state_cleared=stopped - killed,
            next_turn_to_answer=latency,
        )
    finally:
        speech.stop()


def user_turns(llm: LLMStandIn) -> list[str]:
    return [m["content"] for m in llm.requests[-1].messages if m["role"] == "user"]


@BOTH_MODES
async def test_tts_hangs_before_audio(make_settings, llm, barge_in):
    """The first sentence's request (and its one retry) get no answer at all."""
    settings = make_settings(enable_barge_in=barge_in, chatterbox_first_byte_timeout_s=1.0)
    llm.queue_reply(SHORT_REPLY)
    llm.queue_reply(ANSWER)
    async with TTSStandIn(options=TTSStandInOptions(hang_s=30.0)) as speech:
        speech.fault_once("hang", "hang")
        tts = build_tts(settings, base_url=speech.url)
        async with fault_call(settings, llm_base_url=llm.base_url, tts=tts) as call:
            asked = await call.caller_says("how is the garden")
            speaking_at = await call.wait_speaking(timeout=15)
            await call.settle()
            hung = [r for r in speech.requests if r.fault == "hang"]
            assert len(hung) == 2 and all(r.disconnected_at is not None for r in hung), "hung requests left open"
            assert spoken(speech.requests)[:2] == ["Of course.", "Of course."]
            # The rest of the reply was spoken after the lost sentence.
            assert [r for r in speech.requests[2:] if r.completed]
            assert call.errors(asked), "the lost sentence was not reported"
            latency = await call.assert_next_turn_answered("hello again")
            await call.settle()
        report(
            f"TTS hangs before audio ({'barge-in' if barge_in else 'half-duplex'})",
            turn_end_to_first_audio=speaking_at - asked, next_turn_to_answer=latency,
        )


@BOTH_MODES
async def test_tts_frozen_mid_utterance_then_caller_speaks(make_settings, llm, barge_in):
    """SIGSTOP the speech server mid-sentence: the read times out, Annie stops, the call goes on."""
    settings = make_settings(enable_barge_in=barge_in, chatterbox_first_byte_timeout_s=1.0)
    llm.queue_reply(REPLY)
    llm.queue_reply(ANSWER)
    llm.queue_reply(ANSWER)
    speech = ChildServer("agent.demo.standins.tts_server", "--realtime-factor", "1.2")
    await speech.start_async()
    try:
        tts = build_tts(settings, base_url=speech.url)
        async with fault_call(settings, llm_base_url=llm.base_url, tts=tts) as call:
            await call.caller_says("how is the garden")
            await call.wait_speaking()
            await asyncio.sleep(1.5)
            frozen = time.monotonic()
            speech.freeze()
            silent_at = await call.wait_silent(quiet_s=0.3)
            # The caller, hearing nothing, asks again while the server is still frozen.
            await call.wait_until(lambda: not call.status.bot_speaking, 5, "the speaking state to clear")
            asked = await call.caller_says("hello are you there")
            # Thawed: the rest of the old answer must not play; the caller's question is answered.
            await asyncio.sleep(1.0)
            speech.thaw()
            await call.wait_until(lambda: call.heard_text_at(ANSWER, since=asked), 20, "the answer")
            await call.settle(timeout=40)
            assert call.heard_text_at("Shall I read", since=frozen) is None, "stale audio after the freeze"
            assert user_turns(llm)[-1] == "hello are you there"
            latency = await call.assert_next_turn_answered("thank you", timeout=20)
            await call.settle()
        report(
            f"TTS frozen mid-utterance ({'barge-in' if barge_in else 'half-duplex'})",
            freeze_to_silence=silent_at - frozen, next_turn_to_answer=latency,
        )
    finally:
        speech.stop()


@pytest.mark.parametrize(
    "fault, barge_in",
    [("garbage", False), ("garbage", True), ("bad_header", False), ("odd_length", True)],
    ids=["garbage-half-duplex", "garbage-barge-in", "bad_header-half-duplex", "odd_length-barge-in"],
)
async def test_tts_returns_garbage(make_settings, llm, barge_in, fault):
    """Noise without a WAV header, a header announcing 8-bit stereo float, a stray odd byte."""
    settings = make_settings(enable_barge_in=barge_in)
    llm.queue_reply(SHORT_REPLY)
    llm.queue_reply(ANSWER)
    async with TTSStandIn() as speech:
        speech.fault_once(fault)
        tts = build_tts(settings, base_url=speech.url)
        async with fault_call(settings, llm_base_url=llm.base_url, tts=tts) as call:
            asked = await call.caller_says("how is the garden")
            await call.wait_speaking(timeout=15)
            await call.settle()
            # The caller never hears noise, and the rest of the reply is spoken.
            assert call.loudest_rms_since(asked) < NOISE_RMS, f"{call.loudest_rms_since(asked):.0f} RMS: noise played"
            bad = speech.requests[0]
            assert bad.fault == fault and bad.bytes_sent > 0 and bad.body["input"] == "Of course."
            assert [r for r in speech.requests[1:] if r.completed]
            assert any("Chatterbox" in line for line in call.log_lines), "the bad answer was not logged"
            await call.assert_next_turn_answered("hello again")
            await call.settle()

"""The streaming STT fails mid-call: that turn is lost with a log line, the next one is answered.

The assembled call pipeline with Silero VAD and the real NemotronStreamingSTTService on the tiny
random NeMo model (CPU), on the simulated phone line: the caller's espeak-ng speech goes in as
audio, Annie's answers come out of the LLM stand-in and the tone TTS. The engine is a real
subclass whose model call raises once, either while stepping the caller's speech (a partial) or
while finalizing the turn, with a plain RuntimeError or torch's CUDA out-of-memory error.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from pipecat.frames.frames import ErrorFrame, TranscriptionFrame

from agent.services import build_vad
from processors.nemotron.engine import NemotronStreamingEngine
from processors.nemotron.stt import NemotronStreamingSTTService
from tests.doubles import ToneTTSService
from bench.nemo_models import tiny_nemo_once
from tests.test_faults import fault_call, report
from transports.rig.audio import synth_speech

pytestmark = pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng not installed (the caller's voice)")


class FailingEngine(NemotronStreamingEngine):
    """The real engine; its next model call of the chosen kind raises ``error`` once.

    ``where="partial"``: a chunk step while the caller speaks; ``"final"``: the finalizing step at
    the end of the turn (the one with ``keep_all_outputs``). The failure comes from inside the
    model call, after the stream's job for it was built, as a CUDA error would.
    """

    armed: BaseException | None = None
    where = "partial"
    raised = 0

    def _run(self, states, ends, keep_all: bool) -> None:
        if self.armed is not None and keep_all == (self.where == "final"):
            error, self.armed = self.armed, None
            self.raised += 1
            raise error
        super()._run(states, ends, keep_all)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_nemo_once(tmp_path_factory.mktemp("nemo"))


@pytest.fixture(scope="module")
def speech():
    return {
        "first": synth_speech("What is the weather like today?", 16000),
        "second": synth_speech("Please tell me the time.", 16000),
    }


def _oom() -> BaseException:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize(
    "where, make_error",
    [
        ("partial", lambda: RuntimeError("CUDA error: an illegal memory access was encountered")),
        ("partial", _oom),
        ("final", _oom),
    ],
    ids=["step-raises", "step-oom", "finalize-oom"],
)
async def test_stt_failure_loses_one_turn_and_the_next_is_answered(
    make_settings, llm_server, model_path, speech, where, make_error
):
    settings = make_settings(enable_barge_in=True)
    engine = FailingEngine.load(model_path, 160, "cpu")
    engine.where, engine.armed = where, make_error()
    stt = NemotronStreamingSTTService(engine=engine)
    tts = ToneTTSService(ms_per_char=30)
    llm_server.queue_reply("It is three o'clock.")
    async with fault_call(
        settings, llm_base_url=llm_server.base_url, tts=tts, stt=stt,
        vad_analyzer=build_vad(settings), stt_streams_partials=True,
    ) as call:
        await call.settle(quiet_s=0.3)
        lost_at = time.monotonic()
        call.transport.say(speech["first"])
        # The lost turn: the failure is reported and logged, nothing is stuck, and the caller is not
        # left in silence: Annie asks them to repeat (no LLM call, nothing made up).
        await call.wait_until(lambda: engine.raised == 1, 15, "the engine to fail")
        await call.wait_until(lambda: call.errors(), 10, "an ErrorFrame")
        await call.wait_until(lambda: not call.status.user_speaking, 10, "the caller's turn to end")
        lost_errors = call.errors()
        assert all(not e.fatal for e in lost_errors) and any(isinstance(e, ErrorFrame) for e in lost_errors)
        assert any("this turn is lost" in line for line in call.log_lines), call.log_lines
        finals_before = len(call.log.times(TranscriptionFrame))
        assert finals_before == 0, "the failed turn still produced a transcript"
        asked_at = await call.wait_until(lambda: call.audible_since(lost_at) > 0.2, 10, "Annie to ask the caller to repeat")
        assert tts.requests == [settings.repeat_request_text]
        # Nothing was answered: an answer started ahead on the lost turn's partials (preemption)
        # is withdrawn with the turn, so the context has no caller words and no answer.
        context = call.call.context.get_messages()
        assert all(m["role"] == "assistant" and m["content"] == settings.repeat_request_text for m in context), \
            "Annie answered a turn nobody heard"
        await call.settle()

        # The next turn is heard, transcribed and answered out loud.
        asked = time.monotonic()
        call.transport.say(speech["second"])
        await call.wait_until(lambda: llm_server.requests, 20, "the next turn to reach the LLM")
        answer_at = await call.wait_until(lambda: call.audible_since(asked) > 0.2, 20, "Annie to answer")
        await call.settle()
        finals = [f for _, f, _ in call.log.events if isinstance(f, TranscriptionFrame)]
        assert finals and finals[-1].text.strip()
        # The answer heard is the last request's (earlier ones, started ahead on partials, were withdrawn).
        users = [m["content"] for m in llm_server.requests[-1].messages if m["role"] == "user"]
        assert [u.split() for u in users] == [finals[-1].text.split()], "audio of the lost turn leaked into the next one"
        assert engine.raised == 1
    report(
        f"STT {where} step raises {type(lost_errors[0].exception).__name__ if lost_errors[0].exception else 'error'}",
        lost_turn_start_to_error=call.log.times(ErrorFrame)[0] - lost_at,
        lost_turn_start_to_request_to_repeat_heard=asked_at - lost_at,
        next_turn_start_to_answer=answer_at - asked,
    )

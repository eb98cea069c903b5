"""When does the caller's turn end? The timeout against smart-turn, on the same speech, offline.

Each utterance is espeak-ng speech at 16 kHz, fed 20 ms at a time through the agent's Silero VAD
(its start and stop times), and through each turn-end rule:

- ``timeout`` (``TURN_END=timeout``, today): the turn ends ``USER_SPEECH_TIMEOUT_MS`` (400 ms)
  after a VAD stop, unless the voice comes back first;
- ``smart`` (``TURN_END=smart``): pipecat's smart-turn v3 (the ONNX model in its wheel) judges the
  utterance at each VAD stop: complete -> the turn ends then; else it holds, up to
  ``SMART_TURN_MAX_HOLD_MS`` of silence.

Complete questions measure how long after the end of speech the turn ends (the part of
voice-to-voice that is the hold). Sentences with a pause in the middle (0.4-1.2 s, after an
unfinished clause: "I was wondering if ... you could call my daughter") measure cut-ins: the turn
ended in the pause, before the caller had finished. This is the turn-end rule alone, offline: the
pipeline's other stages (STT, LLM, TTS) are not in these figures. Usage:
``python -m bench.turn_end_bench [--quick]``; JSON in ``bench/results/turn_end.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from pipecat.audio.turn.base_turn_analyzer import EndOfTurnState
from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams, VADState

from transports.rig.audio import synth_speech

RESULTS = Path(__file__).resolve().parent / "results"
RATE = 16000
FRAME = 320  # 20 ms
VOICES = ["en-us+f3", "en-us+m3", "en-gb+f2"]
COMPLETE = ["What time is it?", "Can you call my daughter for me?", "What is the weather like today?",
            "I would like to hear a story about the sea."]
PAUSED = [("I was wondering if", "you could call my daughter."), ("So the doctor said that", "I should rest more."),
          ("Could you tell me", "what day it is today?"), ("And then my neighbour", "brought me some soup.")]
PAUSES_S = (0.4, 0.6, 0.8, 1.0, 1.2)


def speech(text: str, voice: str) -> np.ndarray:
    pcm = synth_speech(text, RATE, voice=voice).astype(np.float32)
    return (pcm * (0.1 * 32768 / (np.sqrt(np.mean(pcm**2)) or 1))).astype(np.int16)


def trim(pcm: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm) > 300)
    return pcm[loud[0] : loud[-1] + 1] if loud.size else pcm


async def turn_end(pcm: np.ndarray, rule: str, *, timeout_s: float, max_hold_s: float) -> float | None:
    """Seconds into ``pcm`` at which the rule ends the turn (None: not within the audio)."""
    vad = SileroVADAnalyzer(sample_rate=RATE, params=VADParams(start_secs=0.2, stop_secs=0.2, confidence=0.7))
    vad.set_sample_rate(RATE)
    smart = LocalSmartTurnAnalyzerV3(params=SmartTurnParams(stop_secs=max_hold_s)) if rule == "smart" else None
    if smart is not None:
        smart.set_sample_rate(RATE)
    state, stopped_at = VADState.QUIET, None
    try:
        for i in range(0, len(pcm) - FRAME + 1, FRAME):
            t = (i + FRAME) / RATE
            chunk = pcm[i : i + FRAME].tobytes()
            new = await vad.analyze_audio(chunk)
            speaking = new in (VADState.SPEAKING, VADState.STARTING, VADState.STOPPING)
            if smart is not None and smart.append_audio(chunk, speaking) == EndOfTurnState.COMPLETE:
                return t  # the longest hold ran out
            if new != state and new in (VADState.SPEAKING, VADState.QUIET):
                state = new
                if new == VADState.QUIET:
                    stopped_at = t
                    if smart is not None:
                        verdict, _ = await smart.analyze_end_of_turn()
                        if verdict == EndOfTurnState.COMPLETE:
                            return t
                else:
                    stopped_at = None
            if rule == "timeout" and stopped_at is not None and t - stopped_at >= timeout_s:
                return t
        return None
    finally:
        await vad.cleanup()
        if smart is not None:
            await smart.cleanup()


async def run(quick: bool, timeout_s: float, max_hold_s: float, log=print) -> dict:
    voices = VOICES[:1] if quick else VOICES
    pauses = PAUSES_S[::2] if quick else PAUSES_S
    tail = np.zeros(int((max_hold_s + 1.0) * RATE), dtype=np.int16)
    lead = np.zeros(int(0.3 * RATE), dtype=np.int16)
    results: dict = {"complete": {"timeout": [], "smart": []}, "paused": {"timeout": [], "smart": []}}
    for voice in voices:
        for text in COMPLETE:
            said = trim(speech(text, voice))
            pcm = np.concatenate([lead, said, tail])
            end = (len(lead) + len(said)) / RATE
            for rule in ("timeout", "smart"):
                t = await turn_end(pcm, rule, timeout_s=timeout_s, max_hold_s=max_hold_s)
                results["complete"][rule].append({"voice": voice, "text": text, "after_ms": None if t is None else round(1000 * (t - end))})
        for first, second in PAUSED:
            a, b = trim(speech(first, voice)), trim(speech(second, voice))
            for pause in pauses:
                pcm = np.concatenate([lead, a, np.zeros(int(pause * RATE), dtype=np.int16), b, tail])
                resumed = (len(lead) + len(a)) / RATE + pause
                for rule in ("timeout", "smart"):
                    t = await turn_end(pcm, rule, timeout_s=timeout_s, max_hold_s=max_hold_s)
                    results["paused"][rule].append({"voice": voice, "pause_s": pause, "text": f"{first} ... {second}",
                                                    "cut_in": t is not None and t < resumed})
        log(f"{voice}: done")
    summary = {}
    for rule in ("timeout", "smart"):
        after = [r["after_ms"] for r in results["complete"][rule] if r["after_ms"] is not None]
        cut = [r["cut_in"] for r in results["paused"][rule]]
        summary[rule] = {
            "complete_end_after_speech_ms": {"median": float(np.median(after)) if after else None,
                                             "p95": float(np.percentile(after, 95)) if after else None,
                                             "n": len(after), "never_ended": len(results["complete"][rule]) - len(after)},
            "cut_ins_on_mid_sentence_pauses": {"count": int(sum(cut)), "n": len(cut)},
            "cut_ins_by_pause_s": {str(p): int(sum(r["cut_in"] for r in results["paused"][rule] if r["pause_s"] == p))
                                   for p in pauses},
        }
    return {"summary": summary, "events": results, "timeout_s": timeout_s, "max_hold_s": max_hold_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--timeout-ms", type=int, default=400)
    parser.add_argument("--max-hold-ms", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = asyncio.run(run(args.quick, args.timeout_ms / 1000, args.max_hold_ms / 1000))
    result.update(machine={"python": sys.version.split()[0], "platform": platform.platform()},
                  wall_s=round(time.monotonic() - started, 1),
                  command="python -m bench.turn_end_bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "turn_end.json").write_text(json.dumps(result, indent=1))
    for rule, s in result["summary"].items():
        c, p = s["complete_end_after_speech_ms"], s["cut_ins_on_mid_sentence_pauses"]
        print(f"{rule:8s} complete utterances: turn ends {c['median']} ms (median) / {c['p95']} ms (p95) after the "
              f"speech, n={c['n']}, never {c['never_ended']}; mid-sentence pauses: {p['count']} of {p['n']} cut in "
              f"(by pause length {s['cut_ins_by_pause_s']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

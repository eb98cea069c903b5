"""Voice-to-voice with preemptive generation on and off, through the agent's own pipeline.

Each variant is a call through :func:`agent.pipeline.build_call_pipeline` (pipecat's aggregators,
the LLM service with its speculation gate, the Chatterbox TTS service, the simulated loudspeaker)
against the two stand-in servers on 127.0.0.1, set to the NVIDIA + Daily reference agent's
latencies: LLM first token 162 ms, TTS first audio 107 ms. The caller is a streaming STT shaped
like the Nemotron engine and the VAD, as frames: VAD start, speech, VAD stop (Silero's 200 ms of
silence after the last word), the final 20 ms later. Variants alternate turn by turn (one call
each, open side by side), so the machine's noise falls on both alike.

- complete utterances: voice-to-voice = the VAD's 200 ms + VAD stop -> first audible sample at
  the loudspeaker; with its stages (hold, LLM server to its first token and to the end of its first
  sentence, which is what the TTS starts on, TTS server) and our code's share, the rest: first
  audible - turn end - the servers' time still to come at the turn end;
- callers who pause 0.4-1.2 s mid-sentence: whether the turn ended in the pause (Annie cut in),
  how often an answer started ahead was thrown away, and what that cost the LLM server.

Usage: ``python -m bench.voice_to_voice_bench [--turns 20] [--hold-ms 400]``; JSON and a PNG in
``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    TranscriptionFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)

from agent.config import AgentSettings
from agent.demo.call import running_call
from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions
from agent.demo.standins.tts_server import TTSStandIn, TTSStandInOptions
from agent.services import build_tts

RESULTS = Path(__file__).resolve().parent / "results"
VAD_STOP_S = 0.2  # Silero's stop: silence after the last word before the VAD says so
STT_FINAL_S = 0.02  # the streaming engine's final after the VAD stop
REPLY = "It is ten past three. Would you like me to call your daughter this afternoon?"
COMPLETE = ["What time is it?", "Can you call my daughter for me?", "What is the weather like today?",
            "Please read me the news.", "Did the doctor call this morning?"]
PAUSED = [("I was wondering if", "you could call my daughter."), ("So the doctor said that", "I should rest more."),
          ("Could you tell me", "what day it is today?"), ("And then my neighbour", "brought me some soup.")]
PAUSES_S = (0.4, 0.6, 0.8, 1.0, 1.2)
VARIANTS = {"hold": False, "hold+preempt": True}


def final(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text=text, user_id="caller", timestamp="", finalized=True)


def first_audible(call, after: float) -> float | None:
    times = [c.t for c in list(call.loudspeaker.played) if c.t >= after and c.rms > 200]
    return min(times) if times else None


async def utterance(call, text: str, speech_s: float = 0.6) -> float:
    """VAD start, speech, VAD stop, the final; returns the VAD stop's time."""
    await call.send(VADUserStartedSpeakingFrame(start_secs=0.2))
    await asyncio.sleep(speech_s)
    stop = await call.send(VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP_S))
    await asyncio.sleep(STT_FINAL_S)
    await call.send(final(text))
    return stop


async def complete_turn(call, llm: LLMStandIn, tts: TTSStandIn, text: str) -> dict:
    n_llm, n_tts = len(llm.requests), len(tts.requests)
    stop = await utterance(call, text)
    await call.wait_until(lambda: first_audible(call, stop) is not None, 10, "Annie to answer")
    heard = first_audible(call, stop)
    turn_end = min(t for t in call.log.times(UserStoppedSpeakingFrame) if t >= stop)
    request = llm.requests[-1]
    speech = next(r for r in tts.requests[n_tts:] if r.first_byte_at is not None)
    # The TTS starts on a whole sentence: the LLM server's part ends with the first sentence's last token.
    sentence_at = next(t for t, piece in request.pieces if any(c in piece for c in ".?!"))
    llm_left = max(0.0, sentence_at - max(turn_end, request.started_at))
    tts_server = speech.first_byte_at - speech.started_at
    await call.wait_silent(0.4, 20)
    return {
        "text": text,
        "voice_to_voice_ms": 1000 * (VAD_STOP_S + heard - stop),
        "hold_ms": 1000 * (turn_end - stop),
        "llm_started_after_stop_ms": 1000 * (request.started_at - stop),
        "llm_server_ms": 1000 * (request.first_token_at - request.started_at),
        "llm_first_sentence_ms": 1000 * (sentence_at - request.started_at),
        "tts_server_ms": 1000 * tts_server,
        "ours_ms": 1000 * (heard - turn_end - llm_left - tts_server),
        "llm_requests": len(llm.requests) - n_llm,
    }


async def paused_turn(call, llm: LLMStandIn, first: str, second: str, pause_s: float) -> dict:
    n_llm = len(llm.requests)
    stop = await utterance(call, first, speech_s=0.5)
    # The caller's voice comes back ``pause_s`` after her last word: the VAD stop came 200 ms in.
    await asyncio.sleep(max(0.0, pause_s - VAD_STOP_S - STT_FINAL_S))
    resumed = time.monotonic()
    ended = [t for t in call.log.times(UserStoppedSpeakingFrame) if t >= stop]
    await utterance(call, second, speech_s=0.5)
    await call.wait_until(lambda: first_audible(call, resumed) is not None, 10, "Annie to answer")
    await call.wait_silent(0.4, 20)
    requests = llm.requests[n_llm:]
    said = {m["content"] for m in call.call.context.get_messages() if m["role"] == "user"}
    # An answer started ahead and withdrawn was asked for words that never became a turn of their own.
    thrown = [r for r in requests if r.messages[-1]["content"] not in said]
    return {"pause_s": pause_s, "cut_in": bool(ended), "llm_requests": len(requests),
            "thrown_away": len(thrown), "tokens_thrown_away": sum(r.tokens_sent for r in thrown)}


def settings_for(preempt: bool, hold_ms: int) -> AgentSettings:
    return AgentSettings(stt_backend="whisper", preemptive_generation=preempt, user_speech_timeout_ms=hold_ms,
                         chatterbox_streaming=True)


def stats(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 1), "p95": round(float(np.percentile(values, 95)), 1),
            "n": len(values)} if values else {"n": 0}


async def run(turns: int, hold_ms: int, log=print) -> dict:
    async with AsyncExitStack() as stack:
        llm = await stack.enter_async_context(
            LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.162, token_delay_s=0.015, reply=lambda _m: REPLY)))
        tts = await stack.enter_async_context(TTSStandIn(options=TTSStandInOptions(first_byte_delay_s=0.107)))
        calls = {}
        for name, preempt in VARIANTS.items():
            settings = settings_for(preempt, hold_ms)
            calls[name] = await stack.enter_async_context(
                running_call(settings, llm_base_url=llm.base_url, tts=build_tts(settings, base_url=tts.url)))
        for call in calls.values():  # warm-up: connections, the stand-in's synthesis cache
            await complete_turn(call, llm, tts, COMPLETE[0])
        complete: dict[str, list[dict]] = {name: [] for name in calls}
        for i in range(turns):
            for name, call in calls.items():
                complete[name].append(await complete_turn(call, llm, tts, COMPLETE[i % len(COMPLETE)]))
            log(f"complete {i + 1}/{turns}: " + ", ".join(f"{n} {r[-1]['voice_to_voice_ms']:.0f} ms" for n, r in complete.items()))
        paused: dict[str, list[dict]] = {name: [] for name in calls}
        for first, second in PAUSED:
            for pause in PAUSES_S:
                for name, call in calls.items():
                    paused[name].append(await paused_turn(call, llm, first, second, pause))
            log(f"paused: {first} ... done")
    summary = {}
    for name in calls:
        rows = complete[name]
        summary[name] = {
            **{k: stats([r[k] for r in rows]) for k in ("voice_to_voice_ms", "hold_ms", "llm_started_after_stop_ms",
                                                         "llm_server_ms", "llm_first_sentence_ms", "tts_server_ms", "ours_ms")},
            "cut_ins": {"count": sum(r["cut_in"] for r in paused[name]), "n": len(paused[name])},
            "answers_thrown_away": {"count": sum(r["thrown_away"] for r in paused[name]), "n_turns": len(paused[name]),
                                    "tokens": sum(r["tokens_thrown_away"] for r in paused[name])},
            "llm_requests_per_paused_turn": stats([r["llm_requests"] for r in paused[name]]),
        }
    return {"summary": summary, "complete": complete, "paused": paused, "hold_ms": hold_ms,
            "servers": {"llm_first_token_ms": 162, "tts_first_audio_ms": 107, "vad_stop_ms": 200, "stt_final_ms": 20}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(result["complete"])
    ax.boxplot([[r["voice_to_voice_ms"] for r in result["complete"][n]] for n in names], tick_labels=names)
    ax.axhline(450, linestyle="--", color="grey", label="goal 450 ms")
    ax.axhline(508, linestyle=":", color="grey", label="reference agent 508 ms")
    ax.set_ylabel("voice-to-voice (ms)")
    ax.set_title(f"Complete utterances, hold {result['hold_ms']} ms, reference server latencies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--hold-ms", type=int, default=400)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    result = asyncio.run(run(args.turns, args.hold_ms, log=lambda s: print(s, file=sys.stderr)))
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "voice_to_voice.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "voice_to_voice.png")
    print(f"{'variant':<14} {'v2v p50':>8} {'p95':>6} {'hold':>6} {'LLM 1st sent.':>8} {'TTS srv':>8} {'ours p50':>9} {'ours p95':>9}  cut-ins  thrown away")
    for name, s in result["summary"].items():
        print(f"{name:<14} {s['voice_to_voice_ms']['median']:>8.0f} {s['voice_to_voice_ms']['p95']:>6.0f} "
              f"{s['hold_ms']['median']:>6.0f} {s['llm_first_sentence_ms']['median']:>13.0f} {s['tts_server_ms']['median']:>8.0f} "
              f"{s['ours_ms']['median']:>9.0f} {s['ours_ms']['p95']:>9.0f}  {s['cut_ins']['count']}/{s['cut_ins']['n']}"
              f"  {s['answers_thrown_away']['count']}/{s['answers_thrown_away']['n_turns']}")
    print(f"(n = {args.turns} complete utterances per variant; JSON and PNG in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

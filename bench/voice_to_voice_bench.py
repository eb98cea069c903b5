"""Voice-to-voice with preemptive generation and the turn end on and off, through the agent's own pipeline.

Each variant is a call through :func:`agent.pipeline.build_call_pipeline` (the real Silero VAD,
smart-turn v3 where the turn end is ``smart``, pipecat's aggregators, the LLM service with its
speculation gate, the Chatterbox TTS service, the simulated phone line) against the two stand-in
servers on 127.0.0.1, set to the NVIDIA + Daily reference agent's latencies: LLM first token
162 ms (then 15 ms a token), TTS first audio 107 ms. The caller is espeak-ng speech played into the
line; the STT is a stand-in shaped like the Nemotron engine (a partial per 160 ms chunk 13 ms
after it, the final 20 ms after the VAD stop: ``agent.demo.standins.streaming_stt``). The
variants (``TURN_END`` timeout/smart x ``PREEMPTIVE_GENERATION`` off, on with the LLM only
(``PREEMPTIVE_TTS=0``), on with the first sentence's speech synthesized ahead too, the default;
``TURN_END=adaptive``, the end-of-turn model's hold, without and with both ahead; ``--variants``
picks some) are open side by side and take turns, so the machine's noise falls on all alike.

- complete utterances: voice-to-voice = the caller's last sound -> Annie's first audible sample,
  with its stages (VAD stop, turn end, LLM start, LLM server to its first sentence, which is what
  the TTS starts on, TTS server) and our code's share: first audible - turn end - the servers'
  time still to come at the turn end;
- with ``--servers local``, the demo's real local servers instead (llama.cpp with SmolLM2-135M,
  Piper on the CPU: ``agent.demo.servers``): complete utterances only, voice-to-voice with the
  stages the pipeline's frames show (VAD stop, turn end, LLM start) and whether the heard speech
  was synthesized ahead; the servers' own stages are not recorded there;
- callers who pause 0.4-1.2 s mid-sentence: whether the turn ended in the pause (Annie cut in),
  and the answers started ahead and thrown away, with the LLM tokens they cost;
- with ``--line PRESET``, the same on the PulseAudio rig through a phone line preset (AEC3 in the
  agent; the caller's end from her clean channel, Annie's first audio at the earpiece), one
  variant after the other.

Usage: ``python -m bench.voice_to_voice_bench [--turns 20] [--pauses 0.4,0.8,1.2] [--quick] [--servers local]
[--line handset] [--variants a,b]``; JSON and a PNG in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
from loguru import logger
from pipecat.frames.frames import LLMContextFrame, UserStoppedSpeakingFrame, VADUserStoppedSpeakingFrame

from agent.config import AgentSettings
from agent.demo.call import running_call
from agent.demo.caller import ScriptedCaller, poll_until
from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions
from agent.demo.standins.streaming_stt import ScriptedStreamingSTT
from agent.demo.standins.tts_server import TTSStandIn, TTSStandInOptions
from agent.services import build_tts, build_turn_analyzer, build_vad
from transports.rig.audio import synth_speech
from transports.rig.line import BLOCK_S, PhoneLine, SimLine

RESULTS = Path(__file__).resolve().parent / "results"
RATE = 16000
REPLY = "It is ten past three. Would you like me to call your daughter this afternoon?"
COMPLETE = ["What time is it?", "Can you call my daughter for me?", "What is the weather like today?",
            "Please read me the news.", "Did the doctor call this morning?"]
PAUSED = [("I was wondering if", "you could call my daughter."), ("So the doctor said that", "I should rest more."),
          ("Could you tell me", "what day it is today?"), ("And then my neighbour", "brought me some soup.")]
PAUSES_S = (0.4, 0.6, 0.8, 1.0, 1.2)
# name: (TURN_END, PREEMPTIVE_GENERATION, PREEMPTIVE_TTS)
VARIANTS = {"timeout": ("timeout", False, False), "timeout+llm": ("timeout", True, False),
            "timeout+llm+tts": ("timeout", True, True), "smart": ("smart", False, False),
            "smart+llm": ("smart", True, False), "smart+llm+tts": ("smart", True, True),
            "adaptive": ("adaptive", False, False), "adaptive+llm+tts": ("adaptive", True, True)}
FIRST_SENTENCE = REPLY[: REPLY.index(".") + 1]
REFERENCE_SERVERS = {"llm_first_token_ms": 162, "llm_token_ms": 15, "tts_first_audio_ms": 107, "stt_final_ms": 20}


def speech(text: str) -> np.ndarray:
    pcm = synth_speech(text, RATE, voice="en-us+f3").astype(np.float32)
    loud = np.flatnonzero(np.abs(pcm) > 300)
    pcm = pcm[loud[0] : loud[-1] + 1] if loud.size else pcm
    return (pcm * (0.1 * 32768 / (np.sqrt(np.mean(pcm**2)) or 1))).astype(np.int16)


class Caller(ScriptedCaller):
    """The caller of one variant's call, on a phone line (the simulated line, or the PulseAudio rig
    through a line preset with AEC3): she speaks, and the STT stand-in is told what she says. Her
    end of speech is read from her own channel (on the rig the clean bus before the microphone:
    its end is a loopback latency earlier than the mic's, so voice-to-voice errs long), Annie's
    first audio from the ear; both on the line's ``time.monotonic()`` timeline, in 10 ms blocks."""

    def __init__(self, name: str, call, stt: ScriptedStreamingSTT, line: PhoneLine):
        super().__init__(line)
        self.name, self.call, self.stt = name, call, stt

    async def say(self, segments: list[tuple[str, np.ndarray]], gaps_s: list[float]) -> tuple[float, float]:
        """Play the segments with silence between; returns (when the audio was queued, its length)."""
        self.stt.clear()
        pcm = []
        for i, (text, audio) in enumerate(segments):
            self.stt.expect(text, len(audio) / RATE)
            pcm.append(audio)
            if i < len(gaps_s):
                pcm.append(np.zeros(int(gaps_s[i] * RATE), dtype=np.int16))
        start, end = await self.play(np.concatenate(pcm))
        return start, end - start

    async def answer_after(self, t0: float, length_s: float) -> tuple[float, float]:
        """Wait for the caller's audio to be played and Annie's answer; returns (end of speech, first audible)."""
        await asyncio.sleep(length_s)
        await self.call.wait_until(lambda: not self.line.caller_busy(), 5, "the caller's audio")
        await asyncio.sleep(0.1)  # the rig's recorders are a block or two behind
        end = float(self.voice_times(t0).max()) + BLOCK_S
        # Each look copies the recording: not too often.
        if not await poll_until(lambda: self.ear_times(end).size > 0, 15, poll_s=0.05):
            raise AssertionError("timed out after 15 s waiting for Annie to answer at the ear")
        return end, float(self.ear_times(end).min())

    async def settle(self, quiet_s: float, timeout: float) -> None:
        """Until Annie has been silent at the ear for ``quiet_s``."""
        if not await self.wait_silent(quiet_s, timeout):
            raise AssertionError(f"timed out after {timeout} s waiting for Annie to fall silent at the ear")


async def local_turn(caller: Caller, text: str, audio: np.ndarray) -> dict:
    """A complete utterance against real servers: what the pipeline's own frames show."""
    call = caller.call
    played_before = call.tts.prefetches["played"]
    t0, length = await caller.say([(text, audio)], [])
    end, heard = await caller.answer_after(t0, length)
    stops = [t for t in call.log.times(VADUserStoppedSpeakingFrame) if t >= t0]
    turn_end = min(t for t in call.log.times(UserStoppedSpeakingFrame) if t >= t0)
    starts = [t for t in call.log.times(LLMContextFrame) if t >= t0 and t < heard]
    await caller.settle(0.6, 60)
    return {
        "text": text,
        "voice_to_voice_ms": 1000 * (heard - end),
        "vad_stop_ms": 1000 * (min(stops) - end) if stops else None,
        "turn_end_ms": 1000 * (turn_end - end),
        "llm_start_ms": 1000 * (starts[-1] - end) if starts else None,
        "after_turn_end_ms": 1000 * (heard - turn_end),
        "tts_ahead": call.tts.prefetches["played"] > played_before,
        "llm_requests": len(starts),
    }


async def complete_turn(caller: Caller, llm: LLMStandIn, tts: TTSStandIn, text: str, audio: np.ndarray) -> dict:
    call = caller.call
    n_llm, n_tts = len(llm.requests), len(tts.requests)
    t0, length = await caller.say([(text, audio)], [])
    end, heard = await caller.answer_after(t0, length)
    stops = [t for t in call.log.times(VADUserStoppedSpeakingFrame) if t >= t0]
    turn_end = min(t for t in call.log.times(UserStoppedSpeakingFrame) if t >= t0)
    said = {m["content"] for m in call.call.context.get_messages() if m["role"] == "user"}
    requests = llm.requests[n_llm:]
    answered = [r for r in requests if r.messages[-1]["content"] in said]
    request = answered[-1] if answered else requests[-1]
    # The request whose audio was heard: the last one for the first sentence started before it.
    speech_req = [r for r in tts.requests[n_tts:] if r.body["input"] == FIRST_SENTENCE
                  and r.first_byte_at is not None and r.started_at < heard][-1]
    sentence_at = next(t for t, piece in request.pieces if any(c in piece for c in ".?!"))
    llm_left = max(0.0, sentence_at - max(turn_end, request.started_at))
    tts_server = speech_req.first_byte_at - speech_req.started_at
    # The servers' time still to come when the turn ended: the LLM to its first sentence, then the
    # TTS; for a sentence synthesized ahead, whatever of the TTS's answer had not come yet.
    servers_left = (max(0.0, speech_req.first_byte_at - turn_end) if speech_req.started_at < turn_end
                    else llm_left + tts_server)
    thrown = [r for r in requests if r.messages[-1]["content"] not in said]
    await caller.settle(0.4, 20)
    return {
        "text": text,
        "voice_to_voice_ms": 1000 * (heard - end),
        "vad_stop_ms": 1000 * (min(stops) - end) if stops else None,
        "turn_end_ms": 1000 * (turn_end - end),
        "llm_start_ms": 1000 * (request.started_at - end),
        "llm_first_sentence_ms": 1000 * (sentence_at - request.started_at),
        "tts_server_ms": 1000 * tts_server,
        "tts_ahead": speech_req.started_at < turn_end,
        "ours_ms": 1000 * (heard - turn_end - servers_left),
        "llm_requests": len(requests),
        "thrown_away": len(thrown),
        "tokens_thrown_away": sum(r.tokens_sent for r in thrown),
    }


async def paused_turn(caller: Caller, llm: LLMStandIn, parts: tuple[tuple[str, np.ndarray], ...], pause_s: float) -> dict:
    call = caller.call
    n_llm = len(llm.requests)
    t0, length = await caller.say(list(parts), [pause_s])
    try:
        end, _ = await caller.answer_after(t0, length)
        answered = True
    except AssertionError:  # cut in: Annie answered the head in the pause and was done before the tail ended
        answered = False
    loud = [float(t) for t in caller.voice_times(t0)]
    end = max(loud) + BLOCK_S if not answered else end
    gaps = [(a, b) for a, b in zip(loud, loud[1:]) if b - a > 0.3]
    resumed = gaps[0][1] if gaps else end
    cut_in = any(t0 <= t < resumed for t in call.log.times(UserStoppedSpeakingFrame))
    await caller.settle(0.4, 20)
    said = {m["content"] for m in call.call.context.get_messages() if m["role"] == "user"}
    requests = llm.requests[n_llm:]
    thrown = [r for r in requests if r.messages[-1]["content"] not in said]
    return {"pause_s": pause_s, "cut_in": cut_in, "sound_after_the_sentence": answered, "llm_requests": len(requests),
            "thrown_away": len(thrown), "tokens_thrown_away": sum(r.tokens_sent for r in thrown)}


def stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"median": round(float(np.median(values)), 1), "p95": round(float(np.percentile(values, 95)), 1),
            "n": len(values)} if values else {"n": 0}


async def run_local(turns: int, hold_ms: int, variants: dict, log=print) -> dict:
    """The timeout and adaptive variants against llama.cpp and Piper (the demo's local servers)."""
    from agent.demo.servers import start_backends

    complete_audio = {text: speech(text) for text in COMPLETE}
    async with AsyncExitStack() as stack:
        backends = await start_backends(stack, set(), llm_url="", tts_url="", scripted_reply=lambda _m: REPLY)
        log(f"LLM: {backends.llm_label}; TTS: {backends.tts_label}")
        callers: dict[str, Caller] = {}
        for name, (turn_end, preempt, tts_ahead) in variants.items():
            if turn_end == "smart":
                continue  # smart-turn's figures do not depend on the servers; the simulated run has them
            # Greedy decoding and short answers: every call hears the same answers (a sentence's
            # length sets Piper's time to first audio), and a turn does not wait for a long one.
            settings = AgentSettings(**{**backends.overrides, "llm_temperature": 0.0, "llm_max_tokens": 40,
                                        "stt_backend": "whisper", "turn_end": turn_end,
                                        "preemptive_generation": preempt, "preemptive_tts": tts_ahead,
                                        "user_speech_timeout_ms": hold_ms, "chatterbox_streaming": True})
            stt, line = ScriptedStreamingSTT(), SimLine(settings.audio_out_sample_rate)
            call = await stack.enter_async_context(running_call(
                settings, llm_base_url=backends.llm_url, tts=build_tts(settings, base_url=backends.tts_url),
                stt=stt, vad_analyzer=build_vad(settings), turn_analyzer=build_turn_analyzer(settings),
                transport=line.transport))
            callers[name] = Caller(name, call, stt, line)
        for caller in callers.values():
            await local_turn(caller, COMPLETE[0], complete_audio[COMPLETE[0]])
        complete: dict[str, list[dict]] = {name: [] for name in callers}
        for i in range(turns):
            text = COMPLETE[i % len(COMPLETE)]
            for name, caller in callers.items():
                complete[name].append(await local_turn(caller, text, complete_audio[text]))
            log(f"complete {i + 1}/{turns}: " + ", ".join(f"{n} {r[-1]['voice_to_voice_ms']:.0f}" for n, r in complete.items()))
        labels = {"llm": backends.llm_label, "tts": backends.tts_label}
    summary = {name: {**{k: stats([r[k] for r in rows]) for k in ("voice_to_voice_ms", "vad_stop_ms", "turn_end_ms",
                                                                   "llm_start_ms", "after_turn_end_ms")},
                      "tts_ahead": {"count": sum(r["tts_ahead"] for r in rows), "n_turns": len(rows)}}
               for name, rows in complete.items()}
    return {"summary": summary, "complete": complete, "hold_ms": hold_ms, "servers": labels}


async def reference_servers(stack: AsyncExitStack) -> tuple[LLMStandIn, TTSStandIn]:
    """The LLM and TTS stand-ins at the reference agent's latencies (``REFERENCE_SERVERS``)."""
    llm = await stack.enter_async_context(LLMStandIn(options=LLMStandInOptions(
        first_token_delay_s=REFERENCE_SERVERS["llm_first_token_ms"] / 1000,
        token_delay_s=REFERENCE_SERVERS["llm_token_ms"] / 1000, reply=lambda _m: REPLY)))
    tts = await stack.enter_async_context(TTSStandIn(options=TTSStandInOptions(
        first_byte_delay_s=REFERENCE_SERVERS["tts_first_audio_ms"] / 1000)))
    return llm, tts


def variant_settings(turn_end: str, preempt: bool, tts_ahead: bool, hold_ms: int, **more) -> AgentSettings:
    """A variant's settings against the stand-ins (the STT is the bench's own, streaming)."""
    return AgentSettings(stt_backend="whisper", turn_end=turn_end, preemptive_generation=preempt,
                         preemptive_tts=tts_ahead, user_speech_timeout_ms=hold_ms, chatterbox_streaming=True, **more)


async def run(turns: int, pauses: tuple[float, ...], hold_ms: int, variants: dict, log=print) -> dict:
    complete_audio = {text: speech(text) for text in COMPLETE}
    paused_audio = [((a, speech(a)), (b, speech(b))) for a, b in PAUSED]
    async with AsyncExitStack() as stack:
        llm, tts = await reference_servers(stack)
        callers: dict[str, Caller] = {}
        for name, (turn_end, preempt, tts_ahead) in variants.items():
            settings = variant_settings(turn_end, preempt, tts_ahead, hold_ms)
            stt, line = ScriptedStreamingSTT(), SimLine(settings.audio_out_sample_rate)
            call = await stack.enter_async_context(running_call(
                settings, llm_base_url=llm.base_url, tts=build_tts(settings, base_url=tts.url), stt=stt,
                vad_analyzer=build_vad(settings), turn_analyzer=build_turn_analyzer(settings),
                transport=line.transport))
            callers[name] = Caller(name, call, stt, line)
        for caller in callers.values():  # warm-up: connections, the TTS stand-in's synthesis cache
            await complete_turn(caller, llm, tts, COMPLETE[0], complete_audio[COMPLETE[0]])
        complete: dict[str, list[dict]] = {name: [] for name in callers}
        for i in range(turns):
            text = COMPLETE[i % len(COMPLETE)]
            for name, caller in callers.items():
                complete[name].append(await complete_turn(caller, llm, tts, text, complete_audio[text]))
            log(f"complete {i + 1}/{turns}: " + ", ".join(f"{n} {r[-1]['voice_to_voice_ms']:.0f}" for n, r in complete.items()))
        paused: dict[str, list[dict]] = {name: [] for name in callers}
        for parts in paused_audio:
            for pause in pauses:
                for name, caller in callers.items():
                    paused[name].append(await paused_turn(caller, llm, parts, pause))
            log(f"paused: {parts[0][0]} ... done")
    return {"summary": summarize(complete, paused), "complete": complete, "paused": paused, "hold_ms": hold_ms,
            "servers": REFERENCE_SERVERS}


def summarize(complete: dict[str, list[dict]], paused: dict[str, list[dict]]) -> dict:
    summary = {}
    for name in complete:
        rows, prow = complete[name], paused[name]
        summary[name] = {
            **{k: stats([r[k] for r in rows]) for k in ("voice_to_voice_ms", "vad_stop_ms", "turn_end_ms", "llm_start_ms",
                                                         "llm_first_sentence_ms", "tts_server_ms", "ours_ms")},
            "tts_ahead": {"count": sum(r["tts_ahead"] for r in rows), "n_turns": len(rows)},
            "complete_thrown_away": {"count": sum(r["thrown_away"] for r in rows), "n_turns": len(rows),
                                     "tokens": sum(r["tokens_thrown_away"] for r in rows)},
            "cut_ins": {"count": sum(r["cut_in"] for r in prow), "n": len(prow)},
            "paused_thrown_away": {"count": sum(r["thrown_away"] for r in prow), "n_turns": len(prow),
                                   "tokens": sum(r["tokens_thrown_away"] for r in prow)},
        }
    return summary


async def run_rig(turns: int, pauses: tuple[float, ...], hold_ms: int, variants: dict, preset_name: str,
                  log=print) -> dict:
    """The same turns on a PulseAudio rig line (a line preset, AEC3 in the agent), one variant after
    the other (each its own rig: a rig carries one call), at the reference servers' latencies."""
    from transports.rig.line import RigLine
    from transports.rig.linemodel import preset

    complete_audio = {text: speech(text) for text in COMPLETE}
    paused_audio = [((a, speech(a)), (b, speech(b))) for a, b in PAUSED]
    complete: dict[str, list[dict]] = {}
    paused: dict[str, list[dict]] = {}
    failed: dict[str, list[str]] = {}
    label = ""
    async with AsyncExitStack() as stack:
        llm, tts = await reference_servers(stack)
        for name, (turn_end, preempt, tts_ahead) in variants.items():
            line = await asyncio.to_thread(RigLine, 24000, caller_bus=True, line=preset(preset_name), canceller="aec3")
            label = line.label
            try:
                settings = variant_settings(turn_end, preempt, tts_ahead, hold_ms, audio_out_sample_rate=24000)
                stt = ScriptedStreamingSTT()
                async with running_call(settings, llm_base_url=llm.base_url, tts=build_tts(settings, base_url=tts.url),
                                        stt=stt, vad_analyzer=build_vad(settings), transport=line.transport,
                                        turn_analyzer=build_turn_analyzer(settings)) as call:
                    caller = Caller(name, call, stt, line)
                    await complete_turn(caller, llm, tts, COMPLETE[0], complete_audio[COMPLETE[0]])  # warm-up
                    complete[name] = []
                    for i in range(turns):
                        text = COMPLETE[i % len(COMPLETE)]
                        try:
                            complete[name].append(await complete_turn(caller, llm, tts, text, complete_audio[text]))
                        except (AssertionError, ValueError, IndexError, StopIteration) as e:
                            # Counted, not hidden: a turn whose answer or turn end the bench could not find.
                            failed.setdefault(name, []).append(f"{text}: {type(e).__name__}: {e}")
                            log(f"{name}: turn {i + 1} not measured ({type(e).__name__}: {e})")
                            await caller.settle(0.6, 30)
                    log(f"{name}: complete " + ", ".join(f"{r['voice_to_voice_ms']:.0f}" for r in complete[name]))
                    paused[name] = [await paused_turn(caller, llm, parts, pause) for parts in paused_audio for pause in pauses]
                    log(f"{name}: cut in {sum(r['cut_in'] for r in paused[name])} of {len(paused[name])}")
            finally:
                await asyncio.to_thread(line.close)
    summary = summarize(complete, paused)
    for name in summary:
        summary[name]["not_measured"] = {"count": len(failed.get(name, [])), "n_turns": turns}
    return {"summary": summary, "complete": complete, "paused": paused, "hold_ms": hold_ms,
            "servers": REFERENCE_SERVERS, "line": {"preset": preset_name, "label": label}, "not_measured": failed}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(result["complete"])
    ax.boxplot([[r["voice_to_voice_ms"] for r in result["complete"][n]] for n in names], tick_labels=names)
    ax.axhline(450, linestyle="--", color="grey", label="goal 450 ms")
    ax.axhline(508, linestyle=":", color="grey", label="reference agent 508 ms")
    ax.set_ylabel("voice-to-voice (ms)")
    servers = ("reference server latencies" if "llm_first_token_ms" in result["servers"]
               else "local servers (llama.cpp SmolLM2-135M, Piper), 2-core CPU")
    where = f"rig, {result['line']['preset']} line, AEC3" if "line" in result else "simulated line"
    ax.set_title(f"Complete utterances, {where} (hold {result['hold_ms']} ms), {servers}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 turns, pauses 0.4/0.8/1.2 s")
    parser.add_argument("--pauses", default=",".join(f"{p:g}" for p in PAUSES_S),
                        help="the mid-sentence pauses to try, in seconds (comma-separated)")
    parser.add_argument("--hold-ms", type=int, default=400)
    parser.add_argument("--servers", choices=("reference", "local"), default="reference",
                        help="stand-ins at the reference agent's latencies, or llama.cpp and Piper on this machine")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--line", default=None, help="a line preset (handset, speakerphone, network_delay): the "
                        "turns on the PulseAudio rig through it, AEC3 in the agent, instead of the simulated line")
    parser.add_argument("--label", default=None, help="the result files' name (default voice_to_voice[_local])")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v.strip() and v.strip() not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; use some of {', '.join(VARIANTS)}")
    variants = {v.strip(): VARIANTS[v.strip()] for v in args.variants.split(",") if v.strip()}
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    pauses = tuple(float(p) for p in args.pauses.split(",") if p.strip())
    turns, pauses = (5, PAUSES_S[::2]) if args.quick else (args.turns, pauses)
    say = lambda s: print(s, file=sys.stderr)  # noqa: E731
    local = args.servers == "local"
    if args.line:
        result = asyncio.run(run_rig(turns, pauses, args.hold_ms, variants, args.line, log=say))
    elif local:
        result = asyncio.run(run_local(turns, args.hold_ms, variants, log=say))
    else:
        result = asyncio.run(run(turns, pauses, args.hold_ms, variants, log=say))
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.label or ("voice_to_voice_local" if local else f"voice_to_voice_{args.line}" if args.line else "voice_to_voice")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{stem}.png")
    if local:
        print(f"{'variant':<16} {'v2v p50':>7} {'p95':>5} {'VAD stop':>8} {'turn end':>8} {'LLM start':>9} "
              f"{'after turn end p50':>18} {'p95':>5}  TTS ahead")
        for name, s in result["summary"].items():
            print(f"{name:<16} {s['voice_to_voice_ms']['median']:>7.0f} {s['voice_to_voice_ms']['p95']:>5.0f} "
                  f"{s['vad_stop_ms']['median']:>8.0f} {s['turn_end_ms']['median']:>8.0f} {s['llm_start_ms']['median']:>9.0f} "
                  f"{s['after_turn_end_ms']['median']:>18.0f} {s['after_turn_end_ms']['p95']:>5.0f}  "
                  f"{s['tts_ahead']['count']:>5}/{s['tts_ahead']['n_turns']}")
        print(f"(ms after the caller's last sound; n = {turns} complete utterances per variant; servers: "
              f"{result['servers']['llm']}, {result['servers']['tts']}; JSON and PNG in {args.out})")
        return 0
    print(f"{'variant':<16} {'v2v p50':>7} {'p95':>5} {'VAD stop':>8} {'turn end':>8} {'LLM start':>9} "
          f"{'ours p50':>8} {'p95':>4}  TTS ahead  thrown(complete)  cut-ins  thrown(paused)")
    for name, s in result["summary"].items():
        print(f"{name:<16} {s['voice_to_voice_ms']['median']:>7.0f} {s['voice_to_voice_ms']['p95']:>5.0f} "
              f"{s['vad_stop_ms']['median']:>8.0f} {s['turn_end_ms']['median']:>8.0f} {s['llm_start_ms']['median']:>9.0f} "
              f"{s['ours_ms']['median']:>8.0f} {s['ours_ms']['p95']:>4.0f}  "
              f"{s['tts_ahead']['count']:>5}/{s['tts_ahead']['n_turns']:<4} "
              f"{s['complete_thrown_away']['count']:>7}/{s['complete_thrown_away']['n_turns']:<8} "
              f"{s['cut_ins']['count']:>3}/{s['cut_ins']['n']:<4} {s['paused_thrown_away']['count']:>6}/{s['paused_thrown_away']['n_turns']}")
    for name, why in result.get("not_measured", {}).items():
        print(f"{name}: {len(why)} of {turns} complete turns not measured: " + "; ".join(why))
    print(f"(ms after the caller's last sound; n = {turns} complete utterances and {len(PAUSED) * len(pauses)} "
          f"paused sentences per variant; servers: LLM first token 162 ms + 15 ms/token, TTS first audio 107 ms; "
          f"{'line: ' + result['line']['label'] + '; ' if 'line' in result else ''}"
          f"JSON and PNG in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m agent.preflight``: the operator's gates before putting Annie on the phone.

Each gate prints PASS, FAIL or SKIP with one reason; the exit status is 0 only when no gate
failed (a skip says why it does not apply, e.g. no GPU), 1 when one did, 2 when the settings
themselves are wrong. The gates, in order:

- ``audio``: the configured PulseAudio source and sink exist.
- ``llm``: the LLM server answers a tiny chat completion.
- ``tts``: Chatterbox answers and a cancelled utterance really stops (the TTS smoke test).
- ``gpu``: enough free GPU memory for the speech model (skipped on CPU).
- ``stt``: the configured speech model loads and transcribes an espeak-ng test WAV.
- ``aec``: the box's echo (level against the played test signal, delay) and what each canceller
  leaves of it (PulseAudio's module at the source, AEC3 on the raw mic, none); the configured
  ``ECHO_CANCELLER`` must take it at least 20 dB below the played signal, and the line names a
  better canceller when there is one (measured twice when the first try falls short).

Nothing here needs the agent to be stopped, but ``aec`` plays a test sentence into the line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import wave
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from loguru import logger

from agent.config import AgentSettings, ConfigError, load_settings

Verdict = Literal["PASS", "FAIL", "SKIP"]
MIN_AEC_ATTENUATION_DB = 20.0
SILENT_SOURCE_DBFS = -110.0
AEC_ATTEMPTS = 2
STT_TEST_TEXT = "Hello Annie, please call my daughter tomorrow morning."
MIN_WORDS_HEARD = 0.6
GIB = 1024**3
EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


@dataclass
class GateResult:
    name: str
    verdict: Verdict
    reason: str
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.verdict:<4}  {self.name:<5}  {self.reason}"


def _pass(name: str, reason: str, **details) -> GateResult:
    return GateResult(name, "PASS", reason, details)


def _fail(name: str, reason: str, **details) -> GateResult:
    return GateResult(name, "FAIL", reason, details)


def _skip(name: str, reason: str, **details) -> GateResult:
    return GateResult(name, "SKIP", reason, details)


# --- the gates -------------------------------------------------------------------------------


async def gate_audio(settings: AgentSettings) -> GateResult:
    from agent.preflight_audio import device_names

    sources = await asyncio.to_thread(device_names, "sources")
    sinks = await asyncio.to_thread(device_names, "sinks")
    missing = []
    if settings.pulse_source not in sources:
        missing.append(f"source {settings.pulse_source!r} (PULSE_SOURCE; present: {', '.join(sources) or 'none'})")
    if settings.pulse_sink not in sinks:
        missing.append(f"sink {settings.pulse_sink!r} (PULSE_SINK; present: {', '.join(sinks) or 'none'})")
    if missing:
        return _fail("audio", "missing " + "; ".join(missing))
    return _pass("audio", f"source {settings.pulse_source!r} and sink {settings.pulse_sink!r} present")


async def gate_llm(settings: AgentSettings) -> GateResult:
    """A tiny streamed chat completion, as the agent asks for them; times the first token."""
    url = f"{settings.llm_base_url}/chat/completions"
    body = {
        "model": settings.llm_model,
        "messages": [{"role": "user", "content": "Reply with the single word OK."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {settings.llm_api_key.get_secret_value()}"}
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=settings.llm_timeout_s) as client:
            async with client.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    return _fail("llm", f"{url} answered HTTP {resp.status_code}; check LLM_MODEL={settings.llm_model!r}")
                first_token_s, text = await _read_sse_text(resp.aiter_lines(), started)
    except httpx.TimeoutException:
        return _fail("llm", f"{url} went silent for LLM_TIMEOUT_S={settings.llm_timeout_s:g} s")
    except httpx.HTTPError as e:
        return _fail("llm", f"cannot reach {url} ({type(e).__name__}: {e}); check LLM_BASE_URL and the server")
    except (ValueError, KeyError, IndexError, TypeError):
        return _fail("llm", f"{url} streamed something that is not OpenAI chat-completion chunks")
    total_ms = round((time.monotonic() - started) * 1000)
    if not text.strip() or first_token_s is None:
        return _fail("llm", f"{url} streamed an empty completion")
    ttft_ms = round(first_token_s * 1000)
    return _pass(
        "llm", f"{settings.llm_model} streamed a reply: first token {ttft_ms} ms, done {total_ms} ms",
        first_token_ms=ttft_ms, total_ms=total_ms,
    )


async def _read_sse_text(lines, started: float) -> tuple[float | None, str]:
    """Concatenate the content deltas of an SSE chat-completion stream; (first token s, text)."""
    first, parts = None, []
    async for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        choices = json.loads(payload).get("choices") or [{}]
        piece = (choices[0].get("delta") or {}).get("content") or ""
        if piece and first is None:
            first = time.monotonic() - started
        parts.append(piece)
    return first, "".join(parts)


async def gate_tts(settings: AgentSettings) -> GateResult:
    try:
        from processors.chatterbox.smoke import run_smoke_test
    except ImportError as e:
        return _fail("tts", f"the Chatterbox smoke test is not available ({e})")
    result = await run_smoke_test(settings.chatterbox_url, settings.chatterbox_voice)
    details = {k: v for k, v in asdict(result).items() if k not in ("passed", "reason")}
    if not result.passed:
        return _fail("tts", f"{settings.chatterbox_url}: {result.reason}", **details)
    first = f", first audio {result.first_audio_s * 1000:.0f} ms" if result.first_audio_s is not None else ""
    return _pass("tts", f"{settings.chatterbox_url}: {result.reason}{first}", **details)


def gpu_memory_needed(settings: AgentSettings) -> int:
    """Bytes of free GPU memory the configured STT needs: fp32 weights twice over plus 1 GiB."""
    if settings.stt_backend == "whisper":
        return GIB
    path = settings.stt_model_path
    size = path.stat().st_size if path is not None and path.is_file() else int(2.5 * GIB)
    return 2 * size + GIB


async def gate_gpu(settings: AgentSettings) -> GateResult:
    if settings.stt_backend == "parakeet-http":
        return _skip("gpu", "STT_BACKEND=parakeet-http: the model runs in the sidecar")
    if settings.asr_device == "cpu":
        return _skip("gpu", "ASR_DEVICE=cpu: the speech model runs on the CPU")
    try:
        import torch
    except ImportError:
        return _skip("gpu", "torch is not installed: no GPU use possible")
    if not torch.cuda.is_available():
        if settings.asr_device == "cuda":
            return _fail("gpu", "ASR_DEVICE=cuda but no CUDA GPU is visible (driver, CUDA build of torch?)")
        return _skip("gpu", "no CUDA GPU visible: the speech model would run on the CPU")
    free, total = torch.cuda.mem_get_info()
    need = gpu_memory_needed(settings)
    summary = f"{free / GIB:.1f} GiB free of {total / GIB:.1f} GiB, need {need / GIB:.1f} GiB"
    details = {"free_bytes": free, "total_bytes": total, "need_bytes": need}
    if free < need:
        return _fail("gpu", f"{summary}; free GPU memory or use a smaller ASR model", **details)
    return _pass("gpu", summary, **details)


async def gate_stt(settings: AgentSettings) -> GateResult:
    from processors.errors import SetupError

    from agent.demo.stt_probe import transcribe_wav, word_overlap, write_speech_wav

    with tempfile.TemporaryDirectory(prefix="annie-preflight-") as tmp:
        wav = Path(tmp) / "test.wav"
        try:
            await asyncio.to_thread(write_speech_wav, STT_TEST_TEXT, wav)
        except (OSError, RuntimeError) as e:
            return _fail("stt", f"cannot make the test WAV ({e}); install espeak-ng and sox")
        try:
            from agent.services import build_stt

            started = time.monotonic()
            stt = await asyncio.to_thread(build_stt, settings)
            load_ms = round((time.monotonic() - started) * 1000)
        except (SetupError, ConfigError) as e:
            return _fail("stt", str(e))
        with wave.open(str(wav), "rb") as w:
            pcm, rate = w.readframes(w.getnframes()), w.getframerate()
        heard, errors = await transcribe_wav(stt, pcm, rate)
    backend = settings.stt_backend
    if errors:
        return _fail("stt", f"{backend}: transcription failed: {errors[0]}")
    overlap = word_overlap(STT_TEST_TEXT, heard)
    details = {"load_ms": load_ms, "heard": heard, "words_heard": round(overlap, 2)}
    summary = f"{backend} loaded in {load_ms} ms and heard {overlap:.0%} of the test words ({heard!r})"
    if overlap < MIN_WORDS_HEARD:
        return _fail("stt", summary, **details)
    return _pass("stt", summary, **details)


def canceller_attenuation(m) -> dict[str, float | None]:
    """How far below the played signal the agent would hear it, per ECHO_CANCELLER (None: not measured)."""
    raw = m.raw_mic_dbfs if m.raw_mic else m.source_dbfs
    # Digital silence is a source that delivered nothing (one starting late), not a perfect canceller.
    heard = m.source_dbfs > SILENT_SOURCE_DBFS
    return {
        "pulse": round(m.played_dbfs - m.source_dbfs, 1) if m.raw_mic and heard else None,
        "aec3": None if m.aec3_dbfs is None else round(m.played_dbfs - m.aec3_dbfs, 1),
        "off": round(m.played_dbfs - raw, 1),
    }


# Echo this far below the played signal, and no delay found: the line brings nothing back.
NO_ECHO_DB = 60.0


def recommend(attenuation: dict[str, float | None], configured: str, echo_found: bool = True) -> str | None:
    """The canceller to use instead of the configured one (>= 3 dB better), or None.

    A line with no echo at all gets ``off``: AEC3 cannot learn that nothing comes back and takes
    9-31 dB off the caller whenever Annie speaks (measured offline with livekit 1.2.1; with an echo
    45 dB down it keeps the caller within 2 dB).
    """
    if not echo_found and (attenuation.get("off") or 0.0) >= NO_ECHO_DB:
        return None if configured == "off" else "off"
    measured = {k: v for k, v in attenuation.items() if v is not None}
    best = max(measured, key=measured.get) if measured else None
    if best is None or best == configured:
        return None
    if attenuation.get(configured) is None or measured[best] >= attenuation[configured] + 3.0:
        return best
    return None


async def gate_aec(settings: AgentSettings, attempts: int = AEC_ATTEMPTS) -> GateResult:
    """Play a test sentence into the sink, measure the box's echo (level, delay) and what each
    canceller leaves of it: PulseAudio's (at the configured source), AEC3 (run on the raw mic as
    the agent would) and none. The verdict is the configured ECHO_CANCELLER's; the reason says
    which canceller to use when another does better. A second try if the first falls short (a
    canceller still converging, a moment of CPU starvation), both reported."""
    from agent.preflight_audio import measure_echo

    configured = settings.echo_canceller
    tries, attenuations = [], []
    for _ in range(attempts):
        tries.append(await asyncio.to_thread(measure_echo, settings.pulse_sink, settings.pulse_source))
        attenuations.append(canceller_attenuation(tries[-1]))
        if (attenuations[-1][configured] or 0.0) >= MIN_AEC_ATTENUATION_DB:
            break
    best = max(range(len(tries)), key=lambda i: attenuations[i][configured] or -1e9)
    m, att = tries[best], attenuations[best]
    ours = att[configured]
    echo = (f"echo {att['off']:.1f} dB below the played signal"
            + (f", {m.echo_delay_ms:.0f} ms late" if m.echo_delay_ms is not None else ", no delay found"))
    per = ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in att.items())
    shown = " / ".join("-" if a[configured] is None else f"{a[configured]:.1f}" for a in attenuations)
    summary = f"{echo}; left of it (dB down): {per}; ECHO_CANCELLER={configured}: {shown} dB down"
    better = recommend(att, configured, echo_found=m.echo_delay_ms is not None)
    if better == "off" and m.echo_delay_ms is None:
        summary += "; no echo on this line: use ECHO_CANCELLER=off (AEC3 would only cut into the caller's double talk)"
    elif better:
        summary += f"; use ECHO_CANCELLER={better}"
    erle_base = m.raw_mic_dbfs if m.raw_mic else None
    erle = {"pulse": None if erle_base is None else round(erle_base - m.source_dbfs, 1),
            "aec3": None if m.aec3_dbfs is None else round((m.raw_mic_dbfs if m.raw_mic else m.source_dbfs) - m.aec3_dbfs, 1),
            "off": 0.0}
    details = asdict(m) | {
        "attenuation_db": ours,
        "erle_db": erle[configured],
        "attempts_db": [a[configured] for a in attenuations],
        "canceller": configured,
        "attenuation_by_canceller_db": att,
        "erle_by_canceller_db": erle,
        "recommended": better or configured,
    }
    if ours is None:
        why = ("ECHO_CANCELLER=pulse needs PULSE_SOURCE to be module-echo-cancel's source" if not m.raw_mic
               else f"no audio at all from {settings.pulse_source!r}" if configured == "pulse"
               else f"ECHO_CANCELLER={configured} could not run: {m.aec3_note}")
        return _fail("aec", f"{summary}; {why}", **details)
    if ours < MIN_AEC_ATTENUATION_DB:
        hint = "" if better else " (is module-echo-cancel loaded?)" if configured == "pulse" else ""
        return _fail("aec", f"{summary}; need {MIN_AEC_ATTENUATION_DB:.0f} dB{hint}", **details)
    return _pass("aec", summary, **details)


Gate = Callable[[AgentSettings], Awaitable[GateResult]]
GATES: dict[str, tuple[Gate, float]] = {
    "audio": (gate_audio, 20.0),
    "llm": (gate_llm, 60.0),
    "tts": (gate_tts, 60.0),
    "gpu": (gate_gpu, 30.0),
    "stt": (gate_stt, 300.0),
    "aec": (gate_aec, 90.0),
}


async def run_gate(name: str, settings: AgentSettings) -> GateResult:
    """Run one gate; a timeout or an unexpected exception is a FAIL with its reason, never a crash."""
    gate, timeout = GATES[name]
    try:
        return await asyncio.wait_for(gate(settings), timeout)
    except TimeoutError:
        return _fail(name, f"no verdict within {timeout:g} s")
    except Exception as e:  # noqa: BLE001 - a gate's failure is a verdict, not a crash
        from agent.preflight_audio import AudioCheckError

        if isinstance(e, AudioCheckError):
            return _fail(name, str(e))
        logger.opt(exception=e).debug(f"preflight gate {name} raised")
        return _fail(name, f"{type(e).__name__}: {e}")


async def run_gates(settings: AgentSettings, names: list[str] | None = None) -> list[GateResult]:
    """Run the gates one after another (they share the audio line and the GPU)."""
    results = []
    for name in names or list(GATES):
        results.append(await run_gate(name, settings))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", metavar="GATES", help=f"comma-separated subset of: {', '.join(GATES)}")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else None
    unknown = [n for n in names or [] if n not in GATES]
    if unknown:
        parser.error(f"unknown gate(s) {', '.join(unknown)}; choose from {', '.join(GATES)}")
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"preflight: {e}", file=sys.stderr)
        return EXIT_CONFIG
    results = asyncio.run(run_gates(settings, names))
    for result in results:
        print(result.line(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
    failed = [r.name for r in results if r.verdict == "FAIL"]
    print(f"preflight: {'FAILED: ' + ', '.join(failed) if failed else 'all gates passed'}")
    return EXIT_FAIL if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

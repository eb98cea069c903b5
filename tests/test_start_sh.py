"""start.sh: help, the one-agent-per-audio-source lock, stop, status and logs, run for real."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.status import CallStatus, StatusServer

REPO = Path(__file__).resolve().parent.parent
START = REPO / "start.sh"

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="flock (util-linux) is absent")


@pytest.fixture
def env(tmp_path):
    """start.sh's environment: this interpreter, a private lock dir and log file."""
    e = dict(os.environ)
    e.update(
        ANNIE_PYTHON=sys.executable,
        ANNIE_LOCK_DIR=str(tmp_path / "locks"),
        ANNIE_LOG_FILE=str(tmp_path / "annie.log"),
        PULSE_SOURCE="test_mic_source",
        STT_BACKEND="whisper",
    )
    e.pop("INVOCATION_ID", None)
    e.pop("INTERNAL_TOKEN", None)
    return e


def run(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(START), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command(env):
    result = run(["--help"], env)
    assert result.returncode == 0
    for command in ("setup", "phone", "demo", "preflight", "test", "status", "logs", "stop", "report", "ENABLE_BARGE_IN"):
        assert command in result.stdout


def test_unknown_command_is_refused(env):
    result = run(["dance"], env)
    assert result.returncode == 64 and "unknown command 'dance'" in result.stderr


_HOLDER = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.truncate(0); f.write(f"{os.getpid()}\\n"); f.flush()
print("ready", flush=True)
time.sleep(60)
"""


def _hold_lock(lock: Path) -> subprocess.Popen:
    """A process holding the agent lock of ``lock`` with its pid inside, as a running agent does."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready", "could not take the lock"
    return holder


def _lock_path(env: dict, source: str = "test_mic_source") -> Path:
    return Path(env["ANNIE_LOCK_DIR"]) / f"annie-phone.{source}.lock"


def test_second_agent_on_same_source_is_refused(env):
    holder = _hold_lock(_lock_path(env))
    try:
        result = run(["phone"], env)
        assert result.returncode == 3
        assert "test_mic_source" in result.stderr and f"pid {holder.pid}" in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_agent_on_another_source_is_not_blocked(env):
    holder = _hold_lock(_lock_path(env, "other_source"))
    try:
        env["ENABLE_BARGE_IN"] = "maybe"  # the agent starts, then stops on the wrong setting
        result = run(["phone"], env)
        assert result.returncode == 2, result.stderr
        assert "ENABLE_BARGE_IN" in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_file_does_not_block_and_barge_in_flag_is_passed(env):
    lock = _lock_path(env)
    lock.parent.mkdir(parents=True)
    lock.write_text("99999\n")  # left behind by an agent that died: nobody holds it
    env["STT_MODEL_PATH"] = "/nonexistent/model.nemo"
    env["STT_BACKEND"] = "maybe-not"
    result = run(["phone", "--barge-in"], env)
    assert "ENABLE_BARGE_IN=1" in result.stderr
    assert result.returncode == 2 and "STT_BACKEND" in result.stderr
    # Not under systemd: the log is kept for `start.sh logs`.
    assert "STT_BACKEND" in Path(env["ANNIE_LOG_FILE"]).read_text()
    logs = run(["logs"], env)
    assert logs.returncode == 0 and "STT_BACKEND" in logs.stdout


def test_stop_signals_the_lock_holder(env):
    holder = _hold_lock(_lock_path(env))
    try:
        result = run(["stop"], env)
        assert result.returncode == 0, result.stderr
        assert f"pid {holder.pid}" in result.stdout
        assert holder.wait(timeout=10) == -15  # SIGTERM, the agent's clean-shutdown signal
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_stop_with_nothing_running(env):
    result = run(["stop"], env)
    assert result.returncode == 0 and "no agent is running" in result.stdout


def test_logs_without_a_log_is_a_clear_error(env):
    result = run(["logs"], env)
    assert result.returncode == 1 and "no log yet" in result.stderr


async def _run_async(args: list[str], env: dict) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", str(START), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode, out.decode(), err.decode()


async def test_status_reads_the_endpoint_with_the_token(env):
    status = CallStatus(barge_in=False, stt_backend="whisper")
    server = StatusServer(status, port=0, token="tok-123")
    await server.start()
    try:
        env["STATUS_PORT"] = str(server.port)
        rc, _, err = await _run_async(["status"], env)
        assert rc == 1 and "INTERNAL_TOKEN" in err
        env["INTERNAL_TOKEN"] = "wrong"
        rc, out, err = await _run_async(["status"], env)
        assert rc != 0 and "X-Internal-Token" in out + err
        env["INTERNAL_TOKEN"] = "tok-123"
        rc, out, err = await _run_async(["status"], env)
        assert rc == 0, err
        body = json.loads(out)
        assert body["state"] == "idle" and body["barge_in"] == "off" and body["stt"]["backend"] == "whisper"
    finally:
        await server.stop()


def test_test_command_passes_arguments_to_pytest(env):
    result = run(["test", "--collect-only", "tests/test_status.py"], env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "test_status.py::test_state_follows_user_and_bot_speech" in result.stdout


def test_report_gives_the_shadow_verdict_and_its_exit_status(env, tmp_path):
    from agent.bargein.core import BargeInParams
    from agent.bargein.shadow import ShadowFiles, ShadowLog

    shadow = tmp_path / "shadow"
    result = run(["report", str(shadow)], env)
    assert result.returncode == 2 and "no such directory" in result.stderr and "Traceback" not in result.stderr
    log = ShadowLog(BargeInParams(window_s=1.0))
    log.bot_started(0.0)
    log.bot_stopped(11 * 60.0)  # 11 minutes of Annie's speech, nothing over her
    ShadowFiles(shadow, keep=5).write(log.records(11 * 60.0))
    result = run(["report", str(shadow)], env)
    assert result.returncode == 0, result.stderr
    assert "Annie's speech: 11.0 min" in result.stdout and "verdict: barge-in would behave" in result.stdout
    env["SHADOW_DIR"] = str(shadow)  # the setting, when no folder is named
    assert run(["report"], env).returncode == 0


def test_phone_without_a_venv_says_run_setup(env, tmp_path):
    env["ANNIE_PYTHON"] = str(tmp_path / "no-venv" / "python")
    result = run(["phone"], env)
    assert result.returncode == 1 and "start.sh setup" in result.stderr


def test_status_when_no_agent_listens(env):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(STATUS_PORT=str(port), INTERNAL_TOKEN="tok")
    result = run(["status"], env)
    assert result.returncode == 7 and "is the agent running?" in result.stderr


# --- the real agent on a private PulseAudio rig ------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def live_line(env, tmp_path):
    """A rig, the LLM and TTS stand-ins as servers: what `start.sh phone` needs to run for real."""
    pytest.importorskip("transports.pulse", reason="the PulseAudio transport (transports/pulse.py) is not available")
    rig_module = pytest.importorskip("transports.rig.pulse", reason="the PulseAudio rig is not available")
    if not rig_module.pulseaudio_available():
        pytest.skip("pulseaudio/pactl not installed")
    llm_port, tts_port = _free_port(), _free_port()
    servers = [
        subprocess.Popen([sys.executable, "-m", "agent.demo.standins.llm_server", "--port", str(llm_port)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "agent.demo.standins.tts_server", "--port", str(tts_port)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        with rig_module.PulseRig() as rig:
            line = dict(env) | {k: rig.env[k] for k in ("PULSE_SERVER", "XDG_RUNTIME_DIR", "HOME")}
            line.update(
                PULSE_SOURCE=rig.SOURCE, PULSE_SINK=rig.SINK, STT_BACKEND="whisper", ASR_DEVICE="cpu",
                LLM_BASE_URL=f"http://127.0.0.1:{llm_port}/v1", CHATTERBOX_URL=f"http://127.0.0.1:{tts_port}",
                ANNIE_LOCK_DIR=env["ANNIE_LOCK_DIR"], ANNIE_LOG_FILE=env["ANNIE_LOG_FILE"],
                STATUS_PORT=str(_free_port()), INTERNAL_TOKEN="live-line-token",
            )
            yield line
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)


@pytest.mark.slow
def test_real_agent_holds_its_audio_source_until_stopped(live_line):
    log = Path(live_line["ANNIE_LOG_FILE"])
    agent = subprocess.Popen(["bash", str(START), "phone"], env=live_line, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: log.exists() and "Annie is on the line" in log.read_text() or agent.poll() is not None,
                  90, "the agent to come up")
        assert agent.poll() is None, log.read_text()[-3000:]
        lock = _lock_path(live_line, "echo_cancel_source")
        assert lock.read_text().strip() == str(agent.pid)  # start.sh exec'd the agent: same pid

        # The operator's view of the running agent, through start.sh and the status endpoint.
        _wait_for(lambda: run(["status"], live_line).returncode == 0, 30, "the status endpoint")
        body = json.loads(run(["status"], live_line).stdout)
        assert body["state"] == "idle" and body["barge_in"] == "off"
        assert body["stt"]["backend"] == "whisper" and body["stt"]["model_loaded"] is True

        second = run(["phone"], live_line)
        assert second.returncode == 3, second.stderr
        assert f"pid {agent.pid}" in second.stderr and "echo_cancel_source" in second.stderr

        stopped = run(["stop"], live_line)
        assert stopped.returncode == 0 and f"pid {agent.pid}" in stopped.stdout, stopped.stderr
        assert agent.wait(timeout=20) == 0  # SIGTERM is a clean shutdown
        shutdown = log.read_text() + agent.stderr.read()
        assert "Traceback" not in shutdown and "stopped" in shutdown, shutdown[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()

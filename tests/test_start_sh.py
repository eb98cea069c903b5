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
    for command in ("setup", "phone", "demo", "preflight", "test", "status", "logs", "stop", "ENABLE_BARGE_IN"):
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

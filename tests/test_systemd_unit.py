"""The systemd unit passes `systemd-analyze verify`, and the env example is a valid configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import AgentSettings, load_settings

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "annie-phone.service"
ENV_EXAMPLE = SYSTEMD / "annie-phone.env.example"
# Variables the env file may set besides the agent's settings.
PROCESS_ENV = {"XDG_RUNTIME_DIR", "PULSE_SERVER", "PULSE_COOKIE"}

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is absent (Debian package: systemd)",
)


def _verify(unit_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_dir / UNIT.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


@needs_analyze
def test_unit_verifies_cleanly(tmp_path):
    shutil.copy(UNIT, tmp_path)  # alone: the backoff drop-in needs systemd >= 254
    result = _verify(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path):
    """The check above is live: a misspelt key and a missing program are reported."""
    text = UNIT.read_text().replace("Restart=on-failure", "Restrat=on-failure")
    text = text.replace("ExecStart=/bin/bash", "ExecStart=/nonexistent/bash")
    (tmp_path / UNIT.name).write_text(text)
    result = _verify(tmp_path)
    assert "Restrat" in result.stderr
    assert "/nonexistent/bash" in result.stderr


@needs_analyze
def test_backoff_dropin_verifies_on_new_systemd(tmp_path):
    if _systemd_version() < 254:
        pytest.skip(f"systemd {_systemd_version()} predates RestartSteps (254); the drop-in is optional there")
    shutil.copy(UNIT, tmp_path)
    shutil.copytree(SYSTEMD / "annie-phone.service.d", tmp_path / "annie-phone.service.d")
    result = _verify(tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_has_restart_env_file_user_and_hardening():
    s = _unit_settings()
    assert s["Restart"] == ["on-failure"] and s["RestartSec"]
    assert s["EnvironmentFile"] == ["/etc/annie-phone/annie-phone.env"]
    assert s["User"] == ["annie"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes"}.items():
        assert s[key] == [value], key
    assert s["CapabilityBoundingSet"] == [""]
    # Wrong settings (2) and a busy audio device (3) are not retried.
    assert set(s["RestartPreventExitStatus"][0].split()) == {"2", "3"}
    assert "start.sh phone" in s["ExecStart"][0]


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not NAME=value: {line!r}"
            pairs[key] = value
    return pairs


def test_env_example_names_only_known_settings():
    known = {name.upper() for name in AgentSettings.model_fields} | PROCESS_ENV
    unknown = set(_env_example()) - known
    assert not unknown, f"unknown names in {ENV_EXAMPLE.name}: {sorted(unknown)}"


def test_env_example_loads_as_a_valid_configuration(monkeypatch):
    for key, value in _env_example().items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.stt_backend == "nemotron" and settings.internal_token is not None
    assert settings.enable_barge_in is False

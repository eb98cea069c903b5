"""Shared fixtures: an isolated configuration and the stand-in LLM server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from loguru import logger

from agent.config import AgentSettings

REPO = Path(__file__).resolve().parent.parent

# Settings the agent reads from the environment; tests start from none of them.
_AGENT_ENV = {name.upper() for name in AgentSettings.model_fields} | {"AGENT_CONFIG"}


@pytest.fixture(autouse=True)
def isolated_config(monkeypatch, tmp_path_factory):
    """No developer's environment or config/agent.toml leaks into a test."""
    for name in list(os.environ):
        if name.upper() in _AGENT_ENV:
            monkeypatch.delenv(name)
    empty = tmp_path_factory.getbasetemp() / "empty-agent.toml"
    empty.write_text("")
    monkeypatch.setenv("AGENT_CONFIG", str(empty))


@pytest.fixture(autouse=True, scope="session")
def quiet_logs():
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("TEST_LOG_LEVEL", "WARNING"))


@pytest.fixture
def log_lines():
    """The messages logged at INFO and above while the test runs."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    yield lines
    logger.remove(sink)


@pytest.fixture
def make_settings():
    """Settings as the agent would load them, with keyword overrides (no model needed)."""

    def make(**overrides) -> AgentSettings:
        overrides.setdefault("stt_backend", "whisper")
        return AgentSettings(**overrides)

    return make


@pytest.fixture
async def llm_server():
    from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions

    async with LLMStandIn(options=LLMStandInOptions(first_token_delay_s=0.05, token_delay_s=0.03)) as server:
        yield server

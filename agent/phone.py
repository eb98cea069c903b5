"""``python -m agent.phone``: run Annie on the phone line, or a simulated call.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT included), 2 when a setting is wrong or
a component cannot start (one sentence on stderr names the setting), 1 on an unexpected crash.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from loguru import logger

from agent.config import AgentSettings, load_settings
from processors.errors import SetupError

EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m agent.phone",
        description=(
            "Annie, the household's phone agent: PulseAudio -> Silero VAD -> streaming STT -> "
            "Gemma (OpenAI-compatible) -> Chatterbox TTS -> PulseAudio. Settings come from "
            "environment variables and config/agent.toml (see config/agent.example.toml); "
            "ENABLE_BARGE_IN=1 lets the caller interrupt Annie."
        ),
    )
    parser.add_argument("--config", metavar="PATH", help="TOML settings file (default: config/agent.toml if present)")
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="run a simulated call on this machine (no phone, GPU or servers needed) and exit",
    )
    parser.add_argument("--out", metavar="DIR", default="out/sim", help="where --simulate writes its recordings")
    parser.add_argument(
        "--echo-path",
        action="store_true",
        help="with --simulate: loop Annie's voice back into the caller's mic, as a speakerphone does",
    )
    parser.add_argument(
        "--line",
        metavar="PRESET",
        help="with --simulate: a phone line preset (handset, speakerphone, network_delay, ...: "
        "transports/rig/linemodel.py) for the echo and the caller's voice; ECHO_CANCELLER picks the canceller",
    )
    parser.add_argument(
        "--log-level",
        choices=["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"],
        help="override LOG_LEVEL (TRACE also logs transcripts: a family's conversations)",
    )
    return parser.parse_args(argv)


def configure_logging(level: str) -> None:
    """loguru to stderr. Pipecat's own DEBUG lines quote what was said ("Generating TTS [...]",
    LLM messages), so below INFO they are shown only at TRACE, like our own transcripts."""
    logger.remove()

    def private(record) -> bool:
        return level == "TRACE" or record["level"].no >= 20 or not record["name"].startswith("pipecat")

    logger.add(sys.stderr, level=level, filter=private, backtrace=False, diagnose=False)


async def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop_event)``; SIGTERM and SIGINT set the event instead of raising."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await main(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run_phone(settings: AgentSettings, stop: asyncio.Event) -> None:
    """The real call loop: build services, run the pipeline until a signal, release everything."""
    from pipecat.workers.runner import WorkerRunner

    from agent.pipeline import build_call_pipeline
    from agent.services import build_services, freeze_loaded_objects
    from agent.status import CallStatus, StatusObserver, StatusServer

    status = CallStatus.from_settings(settings)
    token = settings.internal_token.get_secret_value() if settings.internal_token else None
    server = StatusServer(status, port=settings.status_port, token=token)
    await server.start()
    try:
        services = build_services(settings)
        status.model_loaded = True
        logger.debug(f"{freeze_loaded_objects()} objects loaded at start-up frozen out of the garbage collector")
        call = build_call_pipeline(
            settings,
            transport=services.transport,
            stt=services.stt,
            llm=services.llm,
            tts=services.tts,
            vad_analyzer=services.vad_analyzer,
            observers=[StatusObserver(status)],
            shadow_vad=services.shadow_vad,
            speaker_encoder=services.speaker_encoder,
            turn_analyzer=services.turn_analyzer,
        )
        status.shadow = call.shadow
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(call.worker)
        run_task = asyncio.create_task(runner.run())
        stop_task = asyncio.create_task(stop.wait())
        logger.info(f"Annie is on the line (barge-in {'on' if settings.enable_barge_in else 'off'}); status on {server.url}")
        done, _ = await asyncio.wait({run_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if stop_task in done:
            logger.info("shutting down: cancelling the call")
            await call.worker.cancel(reason="signal")
        else:
            stop_task.cancel()
        await run_task
    finally:
        await server.stop()
    logger.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config:
        os.environ["AGENT_CONFIG"] = args.config
    configure_logging(args.log_level or os.environ.get("LOG_LEVEL", "INFO").upper())
    try:
        if args.simulate:
            from agent.demo.simulate import run_simulated_call

            return asyncio.run(run_simulated_call(args.out, log_level=args.log_level, echo_path=args.echo_path,
                                                  line_preset=args.line))
        settings = load_settings()
        configure_logging(args.log_level or settings.log_level)
        asyncio.run(run_until_signalled(lambda stop: run_phone(settings, stop)))
        return EXIT_OK
    except SetupError as e:  # ConfigError is one
        print(f"annie: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if gc.get_freeze_count():  # something was loaded and frozen (agent.services): give it back
            from agent.services import release_frozen_objects

            release_frozen_objects()


if __name__ == "__main__":
    sys.exit(main())

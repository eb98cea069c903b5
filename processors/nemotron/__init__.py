"""The in-process streaming Nemotron ASR: the engine (sync, no asyncio) and its pipecat STT service.

The public surface is :class:`NemotronStreamingEngine` and :class:`NemotronStreamingSTTService`;
slots, graphs, mel, text, attention and the model loader sit behind them. Models with random
weights for the tests and benchmarks (tiny and full-size) are built by ``bench/nemo_models.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["NemotronStreamingEngine", "NemotronStreamingSTTService", "StreamState"]

if TYPE_CHECKING:
    from processors.nemotron.engine import NemotronStreamingEngine, StreamState
    from processors.nemotron.stt import NemotronStreamingSTTService


def __getattr__(name: str):
    # Lazy: importing one module of the package (the text decoder) does not load
    # torch, NeMo and pipecat for the others.
    if name in ("NemotronStreamingEngine", "StreamState"):
        from processors.nemotron import engine

        return getattr(engine, name)
    if name == "NemotronStreamingSTTService":
        from processors.nemotron.stt import NemotronStreamingSTTService

        return NemotronStreamingSTTService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The fast path's elementwise chains fused by ``torch.compile`` (batches, optional: ``fuse=True``).

Between its matrix products a streaming step is hundreds of small elementwise kernels per layer
(norms, residual adds, casts, the GLU, the joint's add and ReLU, the greedy search's ``where``s):
at a thousand streams each reads and writes the whole [B, T, D] activation, and together they
take more GPU time than the products. The pieces of a layer between the places where caches are
read or written (``processors.nemotron.encoder_step``, ``processors.nemotron.attention``) and one
symbol of the greedy search (``processors.nemotron.graphs``) are pure functions of tensors; here
they are compiled once each (dynamic batch, so every bucket shares the code, and every layer the
same code: modules are inputs), and captured into the CUDA graphs like any other kernels.

A piece that fails to compile or run compiled is run as written, and the rest of the process
runs uncompiled (one warning): the arithmetic is the same, only slower. One stream never takes
this path (it keeps NeMo's own arithmetic, see ``attention.logical_attention``). On the CPU it runs
too (inductor's C++ kernels; the tests compare it with eager NeMo there), to no gain. Measured on
an H100 (``bench/results/2026-12-07-asr-fused.md``): -7 ms of GPU time in a 2,500-stream step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from loguru import logger

_compiled: dict[Callable, Callable] = {}
_failed: list[str] = []  # once one piece failed, every piece runs as written


def fused(fn: Callable, on: bool = True) -> Callable:
    """``fn`` compiled (when ``on`` and nothing failed before), else ``fn`` itself.

    ``fn`` must be pure (no tensor is written in place): on a failure it runs again as written.
    """
    if not on or _failed:
        return fn
    call = _compiled.get(fn)
    if call is None:
        call = _compiled[fn] = _guarded(fn)
    return call


def failed() -> str | None:
    """Why the compiled pieces were given up, if they were."""
    return _failed[0] if _failed else None


def _guarded(fn: Callable) -> Callable:
    import torch._dynamo

    # Every layer calls the same pieces with its own modules; each kind of step (first, steady,
    # final) may specialise once more. Past the limit dynamo would run the piece as written.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled = torch.compile(fn, dynamic=True)

    def call(*args):
        if _failed:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as e:  # a compiler or toolchain fault: the same arithmetic, uncompiled
            _failed.append(f"{fn.__qualname__}: {type(e).__name__}: {e}")
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # a graph capture fails as a whole (the stepper steps without graphs)
            logger.warning(f"Fusing the ASR step's elementwise work failed ({_failed[-1][:300]}); it runs unfused")
            return fn(*args)

    call.__wrapped__ = fn
    return call

"""Waits on a rig recording (``transports.rig.audio.Recorder``): for data, not for wall-clock time.

A test that sleeps a fixed time and then looks at what a recorder caught fails on a busy machine,
where the audio, the recorder or the event loop runs late. These wait until the recording itself
shows what the test needs (audio past a moment, a loud onset, the end of a sound), with a timeout
that only bounds a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

LOUD_DBFS = -45.0


async def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``predicate`` every 20 ms; returns when it holds, raises AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic()


async def recorded_past(recorder, t: float, timeout: float = 10.0) -> None:
    """Wait until ``recorder`` holds audio read after monotonic time ``t``."""
    await wait_for(lambda: (times := recorder.snapshot().block_end_times).size and times[-1] > t, timeout,
                   f"the recorder to get past {t:.1f}")


async def loud_at(recorder, after: float, timeout: float = 10.0, threshold_dbfs: float = LOUD_DBFS) -> float:
    """Wait for audio louder than ``threshold_dbfs`` recorded after ``after``; returns its read time."""
    await wait_for(lambda: recorder.snapshot().first_loud_time(threshold_dbfs, after) is not None, timeout,
                   "loud audio at the recorder")
    return recorder.snapshot().first_loud_time(threshold_dbfs, after)


async def loud_then_quiet(
    recorder, after: float, quiet_s: float = 0.3, timeout: float = 15.0, threshold_dbfs: float = LOUD_DBFS
) -> float:
    """Wait until a sound recorded after ``after`` has ended (``quiet_s`` recorded past its last loud
    block); returns the read time of that last loud block."""
    await loud_at(recorder, after, timeout, threshold_dbfs)

    def ended() -> bool:
        rec = recorder.snapshot()
        return rec.block_end_times[-1] - rec.last_loud_time(threshold_dbfs, after) >= quiet_s

    await wait_for(ended, timeout, "the sound at the recorder to end")
    return recorder.snapshot().last_loud_time(threshold_dbfs, after)

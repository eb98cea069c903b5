"""The scripted caller: the one caller the demo, the benchmarks and the tests put on a phone line.

A :class:`ScriptedCaller` speaks on a :class:`transports.rig.line.PhoneLine` (the simulated line or
the PulseAudio rig, through any line preset) and watches only what a caller can: her own voice
and what reaches her ear. The scripts build on it:

- the demo's call, which then judges it (:class:`agent.demo.simulate.CallScript`);
- the barge-in bench's caller, who interrupts, backchannels and coughs on a plan
  (``bench.bargein_script.CallerScript``);
- the voice-to-voice bench's caller, who times Annie's answers (``bench.voice_to_voice_bench.Caller``);
- the soak's caller, who speaks in the frames the VAD and the STT would make, so that hours of
  calls run at speed, and listens at the ear like the others (``bench.soak.Caller``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from transports.rig.line import BLOCK_S, CALLER_RATE, PhoneLine, loud_blocks


async def poll_until(predicate: Callable[[], bool], timeout: float, poll_s: float = 0.02) -> bool:
    """Until ``predicate()`` holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


class ScriptedCaller:
    """A caller on ``line``: speaks int16 16 kHz audio, and hears what the line brings to her ear.
    Times are ``time.monotonic()`` seconds, the line's timeline."""

    def __init__(self, line: PhoneLine):
        self.line = line

    async def play(self, pcm: np.ndarray) -> tuple[float, float]:
        """Speak ``pcm`` once her last audio has played (at most 10 s on); returns when it starts and ends."""
        await poll_until(lambda: not self.line.caller_busy(), 10)
        start = time.monotonic()
        return start, start + self.line.say(pcm)

    # -- her ear ------------------------------------------------------------------------------
    def audible_after(self, t: float, margin_s: float = 0.2) -> bool:
        """Annie was heard more than ``margin_s`` after ``t`` (the margin: a block that was
        already playing at ``t`` is not a new sound)."""
        return self.line.sink_last_loud(after=t + margin_s) is not None

    def silent_for(self, seconds: float) -> bool:
        """Annie was heard, and not for the last ``seconds``."""
        last = self.line.sink_last_loud()
        return last is not None and time.monotonic() - last > seconds

    async def wait_silent(self, quiet_s: float, timeout: float) -> bool:
        """Until nothing reached her ear for ``quiet_s`` (or nothing ever did)."""

        def quiet() -> bool:
            last = self.line.sink_last_loud()
            return last is None or time.monotonic() - last >= quiet_s

        return await poll_until(quiet, timeout, poll_s=0.05)

    # -- both channels, as recorded -----------------------------------------------------------
    def voice_times(self, since: float) -> np.ndarray:
        """Start times of the loud 10 ms blocks of her own voice since ``since``."""
        return self._loud(since, 0)

    def ear_times(self, since: float) -> np.ndarray:
        """Start times of the loud 10 ms blocks at her ear since ``since``."""
        return self._loud(since, 1)

    def _loud(self, since: float, track: int) -> np.ndarray:
        pcm = self.line.channels(since, time.monotonic())[track]
        return since + np.flatnonzero(loud_blocks(pcm, CALLER_RATE)) * BLOCK_S


__all__ = ["ScriptedCaller", "poll_until"]

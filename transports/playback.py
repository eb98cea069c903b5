"""Pausable playback: what an output transport offers the pause-then-decide barge-in.

An output that implements :class:`PausablePlayback` can be paused the moment the caller makes a
sound while Annie speaks: it silences the sink at once, keeps what it had not played yet, and
either resumes from exactly there (a backchannel, a cough) or drops it all when the interruption
is committed (an ``InterruptionFrame``). It also remembers the words Annie is saying, so an
echo of her own voice can be told apart from the caller.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol, runtime_checkable

from transports.words import words_of

__all__ = ["PausablePlayback", "PlaybackGate", "words_of"]


@runtime_checkable
class PausablePlayback(Protocol):
    async def pause_playback(self) -> None:
        """Silence the sink now; keep the audio not yet played."""

    async def resume_playback(self, backup_ms: int = 0) -> None:
        """Play on from where the pause cut in (``backup_ms`` earlier, to repeat a cut word)."""

    def recent_bot_words(self) -> set[str]:
        """Words of what Annie is saying or just said (for the echo guard)."""


class PlaybackGate:
    """The state an output keeps for pausing: a gate for the writer and the held audio.

    The output's writer awaits :meth:`wait_open` before each write; it returns False when the
    wait ended because an interruption dropped the held audio (the chunk must not be played).
    """

    def __init__(self, recent_sentences: int = 4):
        self._open = asyncio.Event()
        self._open.set()
        self._generation = 0
        self.held = b""
        # Sentences reach the output when synthesised, a little ahead of playback: the last few
        # cover the one playing now. Older ones are not echo any more.
        self._sentences: deque[list[str]] = deque(maxlen=recent_sentences)

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def close(self, held: bytes) -> None:
        self.held = held
        self._open.clear()

    def open(self) -> bytes:
        """Reopen the gate; returns the held audio, which the caller plays first."""
        held, self.held = self.held, b""
        self._open.set()
        return held

    def drop(self) -> None:
        """An interruption: forget the held audio and release a waiting writer without playing."""
        self._generation += 1
        self.held = b""
        self._open.set()

    async def wait_open(self) -> bool:
        if self._open.is_set():
            return True
        generation = self._generation
        await self._open.wait()
        return generation == self._generation

    def note_spoken(self, text: str) -> None:
        words = words_of(text)
        if words:
            self._sentences.append(words)

    @property
    def spoken_words(self) -> set[str]:
        return {word for sentence in self._sentences for word in sentence}

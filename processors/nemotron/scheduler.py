"""Many calls on one streaming engine: join and leave at any time, one batched step per tick.

Synchronous and thread-safe; no asyncio. Callers (one per call, any thread) :meth:`push` audio;
one worker calls :meth:`tick`, which steps every stream holding a whole chunk as one batch (on
the engine's fast path: padded into a fixed bucket and replayed as a CUDA graph). Each stream
keeps its own slot and state, so its tokens never depend on which other streams share a tick:
the tests compare every stream with the same audio run alone through the eager engine.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable

import numpy as np

from processors.nemotron.engine import NemotronStreamingEngine, StreamState


class UnknownStreamError(KeyError):
    """A stream id that never joined or has already left."""


class StreamScheduler:
    """Streams of many calls on one :class:`NemotronStreamingEngine`."""

    def __init__(self, engine: NemotronStreamingEngine):
        self.engine = engine
        self._streams: dict[int, StreamState] = {}
        self._inbox: dict[int, list] = {}  # audio pushed since the last tick, per stream
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the stream table and each stream's audio
        self._step_lock = threading.Lock()  # one tick or finalize at a time

    def join(self, sample_rate: int = 16000) -> int:
        """A new stream (call); returns its id."""
        state = self.engine.new_stream(sample_rate=sample_rate)
        with self._lock:
            stream_id = next(self._ids)
            self._streams[stream_id] = state
            self._inbox[stream_id] = []
        return stream_id

    def leave(self, stream_id: int) -> None:
        """Forget a stream; its slot is free for the next caller. Its pending audio is dropped."""
        with self._step_lock, self._lock:
            state = self._streams.pop(stream_id, None)
            self._inbox.pop(stream_id, None)
        if state is None:
            raise UnknownStreamError(stream_id)
        state.reset()

    def push(self, stream_id: int, pcm: np.ndarray | bytes) -> None:
        """Queue audio (16-bit PCM bytes, int16 or float samples) for the next ticks; never waits
        for a step (the audio is handed to the stream at the start of the next tick)."""
        if not isinstance(pcm, np.ndarray):
            pcm = bytes(pcm)
        with self._lock:
            self._get(stream_id)
            self._inbox[stream_id].append(pcm)

    def tick(self) -> dict[int, str]:
        """Step every stream that holds a whole chunk (one chunk each), as one batch.

        Returns the new partial text of the streams whose text changed. Call it again while
        :meth:`pending` is true to catch up streams that hold more than one chunk.
        """
        with self._step_lock:
            self._drain()
            with self._lock:
                ready = [(i, s) for i, s in self._streams.items() if self.engine.ready(s)]
            if not ready:
                return {}
            texts = self.engine.step([s for _, s in ready])
        return {i: t for (i, _), t in zip(ready, texts) if t is not None}

    def pending(self) -> bool:
        """Whether some stream holds a whole chunk not yet stepped."""
        with self._step_lock:
            self._drain()
            with self._lock:
                return any(self.engine.ready(s) for s in self._streams.values())

    def finalize(self, stream_ids: Iterable[int], pad_ms: int | None = None) -> dict[int, str]:
        """End the turns of these streams (their last steps batched); final texts; streams stay joined."""
        ids = list(stream_ids)
        with self._step_lock:
            self._drain()
            with self._lock:
                states = [self._get(i) for i in ids]
            texts = self.engine.finalize_many(states, pad_ms)
        return dict(zip(ids, texts))

    def _drain(self) -> None:
        """Hand the pushed audio to the streams (under the step lock, so no step reads meanwhile)."""
        with self._lock:
            batches = [(self._streams[i], pieces) for i, pieces in self._inbox.items() if pieces]
            for i in self._inbox:
                self._inbox[i] = []
        for state, pieces in batches:
            for pcm in pieces:
                self.engine.feed(state, pcm)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def _get(self, stream_id: int) -> StreamState:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise UnknownStreamError(stream_id) from None

"""When frames went by: the one observer the tests, the benchmarks and the demo time a call with.

:class:`FrameTimes` notes the first sighting (``time.monotonic()``) of each watched frame by
kind, the transcripts, and every chunk the TTS synthesized, in order (what the sink's samples are
compared with), and counts each kind. With ``keep_all`` it also keeps every frame pushed anywhere,
with its time and source, for tests that look for any frame type (:meth:`times`); with
``keep_last`` it keeps only the latest sightings of each kind (the soak's hours of call).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque
from functools import partial

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.tts_service import TTSService

WATCHED = {
    VADUserStartedSpeakingFrame: "vad_start",
    VADUserStoppedSpeakingFrame: "vad_stop",
    InterimTranscriptionFrame: "partial",
    TranscriptionFrame: "final",
    InterruptionFrame: "interruption",
    LLMFullResponseStartFrame: "llm_start",
    LLMTextFrame: "llm_text",
    TTSAudioRawFrame: "tts_audio",
    BotStartedSpeakingFrame: "bot_started",
    BotStoppedSpeakingFrame: "bot_stopped",
    UserStartedSpeakingFrame: "turn_started",
    UserStoppedSpeakingFrame: "turn_ended",
    TTSStartedFrame: "tts_started",
    ErrorFrame: "error",
}
# Kinds noted in either direction (the others downstream only): an interruption is broadcast, an
# error goes upstream.
EITHER_WAY = ("interruption", "error")


class FrameTimes(BaseObserver):
    """First sighting of each watched frame, by kind; the transcripts; the synthesized audio."""

    def __init__(self, keep_all: bool = False, keep_last: int | None = None):
        super().__init__()
        kept = partial(deque, maxlen=keep_last) if keep_last else list
        self.by_kind: dict[str, list[float]] = defaultdict(kept)
        self.tts_audio: list[tuple[float, bytes, int]] = kept()
        self.transcripts: list[tuple[float, str, str]] = kept()  # (time, "partial" | "final", text)
        self.counts: Counter[str] = Counter()  # every sighting of each kind, kept or not
        # (time, frame, source) of every push, when keep_all (tests; grows with the call).
        self.events: list[tuple[float, Frame, str]] = []
        self._keep_all = keep_all
        self._seen: dict[int, None] = {}

    def first_sighting(self, frame: Frame) -> bool:
        """True the first time a frame is seen (it is reported once per hop, broadcast frames
        once per direction). Remembers the last 20,000."""
        if frame.id in self._seen:
            return False
        self._seen[frame.id] = None
        if len(self._seen) > 20000:
            self._seen.pop(next(iter(self._seen)))
        return True

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if self._keep_all:
            self.events.append((time.monotonic(), frame, str(data.source)))
        if isinstance(frame, InputAudioRawFrame):
            return
        kind = WATCHED.get(type(frame))
        if kind is None:
            kind = next((k for cls, k in WATCHED.items() if isinstance(frame, cls)), None)
        if kind is None or frame.id in self._seen:
            return
        if kind == "tts_audio" and not isinstance(data.source, TTSService):
            return  # the output transport re-chunks what it played into new frames: not synthesized audio
        if kind in EITHER_WAY or data.direction == FrameDirection.DOWNSTREAM:
            self.first_sighting(frame)
            now = time.monotonic()
            if kind == "interruption" and self.by_kind[kind] and now - self.by_kind[kind][-1] < 0.05:
                return  # one interruption is broadcast as two frames (upstream and downstream)
            self.by_kind[kind].append(now)
            self.counts[kind] += 1
            if kind == "tts_audio":
                self.tts_audio.append((now, frame.audio, frame.sample_rate))
            elif kind in ("partial", "final"):
                self.transcripts.append((now, kind, frame.text))

    def first(self, kind: str, after: float, before: float = float("inf")) -> float | None:
        return next((t for t in self.by_kind.get(kind, []) if after <= t < before), None)

    def last(self, kind: str) -> float | None:
        times = self.by_kind.get(kind)
        return times[-1] if times else None

    @property
    def bot_speaking(self) -> bool:
        """Annie announced a start of speech and no stop since."""
        started, stopped = self.last("bot_started"), self.last("bot_stopped")
        return started is not None and (stopped is None or stopped < started)

    def count(self, kind: str, after: float, before: float) -> int:
        return sum(1 for t in self.by_kind.get(kind, []) if after <= t < before)

    def produced(self) -> bytes:
        """Every synthesized sample, in order (as the TTS made it)."""
        return b"".join(audio for _, audio, _ in self.tts_audio)

    def times(self, frame_type: type) -> list[float]:
        """When each frame of ``frame_type`` was first pushed (``keep_all`` only)."""
        seen: dict[int, float] = {}
        for t, frame, _ in self.events:
            if isinstance(frame, frame_type) and frame.id not in seen:
                seen[frame.id] = t
        return sorted(seen.values())

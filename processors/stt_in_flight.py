"""Whether an STT service still has the caller's audio in flight (heard, not yet transcribed).

The empty-turn watchdog (``agent.turns``) asks this before it closes a caller turn that no
transcript ended: an STT slower than real time (Whisper on a busy CPU) is still working on the
turn, and its transcript is on its way. :class:`SegmentInFlight` gives pipecat's segmented
services (Whisper, the Parakeet sidecar) the ``audio_in_flight`` property; the streaming
Nemotron service has its own.
"""

from __future__ import annotations

from typing import Any

from loguru import logger
from pipecat.frames.frames import TranscriptionFrame


def audio_in_flight(stt: Any) -> bool:
    """What the service says; a service that cannot tell is taken to have nothing in flight."""
    return bool(getattr(stt, "audio_in_flight", False))


def words_in_flight(stt: Any) -> bool:
    """Whether words the caller said are still to come from the service (the adaptive hold waits
    for them): its ``words_in_flight`` where it has one (the streaming service steps the quiet
    after her speech too, which is audio in flight but no words), else ``audio_in_flight``."""
    return bool(getattr(stt, "words_in_flight", audio_in_flight(stt)))


class SegmentInFlight:
    """Mixin for a pipecat ``SegmentedSTTService``: a segment is in flight from the VAD stop that
    queues it until its transcription (or failure) is done. Pipecat 1.14 transcribes queued
    segments one at a time in a background task (``_segment_queue``)."""

    _transcribing = 0

    @property
    def audio_in_flight(self) -> bool:
        queue = getattr(self, "_segment_queue", None)
        return self._transcribing > 0 or (queue is not None and not queue.empty())

    async def run_stt(self, audio: bytes):
        self._transcribing += 1
        done = False
        try:
            async for frame in super().run_stt(audio):
                if isinstance(frame, TranscriptionFrame) and not done:
                    # Not in flight once it is pushed: what waits for it sees it and nothing pending.
                    done = True
                    self._transcribing -= 1
                yield frame
        finally:
            if not done:
                self._transcribing -= 1
                # The segment's audio gave no words (judged not speech, e.g. Whisper's no-speech
                # filter, or it failed): said here, so that no caller audio goes without a line.
                seconds = len(audio) / 2 / max(1, getattr(self, "sample_rate", 0) or 16000)
                logger.info(f"{self}: no words in a {seconds:.1f} s segment of the caller's audio")

"""Whether an STT service still has the caller's audio in flight (heard, not yet transcribed).

The empty-turn watchdog (``agent.turns``) asks this before it closes a caller turn that no
transcript ended: an STT slower than real time (Whisper on a busy CPU) is still working on the
turn, and its transcript is on its way. :class:`SegmentInFlight` gives pipecat's segmented
services (Whisper, the Parakeet sidecar) the ``audio_in_flight`` property; the streaming
Nemotron service has its own.

Segments: every STT here finalizes on a VAD stop, one segment (utterance) at a time, in order.
Each service counts the segments it has been handed (``segments_ended``: one per VAD stop it
will transcribe) and marks each final with its segment's number (:func:`segment_of`), so the
barge-in decision can tell a slow STT's final of an earlier utterance from the words of the
sound that paused Annie (``agent.bargein.core``).
"""

from __future__ import annotations

from typing import Any

from loguru import logger
from pipecat.frames.frames import TranscriptionFrame


SEGMENT_ATTR = "stt_segment"


def mark_segment(frame: TranscriptionFrame, segment: int) -> TranscriptionFrame:
    """Mark a final with the number of the segment it transcribes (1 for the first of the call)."""
    setattr(frame, SEGMENT_ATTR, segment)
    return frame


def segment_of(frame: Any) -> int | None:
    """The segment number a final was marked with; None for partials and unmarked services."""
    return getattr(frame, SEGMENT_ATTR, None)


def segments_ended(stt: Any) -> int | None:
    """How many segments the service has been handed so far (None: it does not count them)."""
    return getattr(stt, "segments_ended", None)


def audio_in_flight(stt: Any) -> bool:
    """What the service says; a service that cannot tell is taken to have nothing in flight."""
    return bool(getattr(stt, "audio_in_flight", False))


def words_in_flight(stt: Any) -> bool:
    """Whether words the caller said are still to come from the service (the adaptive hold waits
    for them): its ``words_in_flight`` where it has one (the streaming service steps the quiet
    after her speech too, which is audio in flight but no words), else ``audio_in_flight``."""
    return bool(getattr(stt, "words_in_flight", audio_in_flight(stt)))


def _counted(run_stt):
    """``run_stt`` with the segment counted, its finals marked and its time in flight kept."""

    async def counted(self, audio: bytes):
        # Pipecat's segment task calls this right after taking the segment off its queue (no
        # await in between), so ``segments_ended`` never misses a segment.
        self._segments_started += 1
        segment = self._segments_started
        self._transcribing += 1
        done = False
        try:
            async for frame in run_stt(self, audio):
                if isinstance(frame, TranscriptionFrame):
                    mark_segment(frame, segment)
                    if not done:
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

    counted.counts_segments = True
    return counted


class SegmentInFlight:
    """Mixin for a pipecat ``SegmentedSTTService``: a segment is in flight from the VAD stop that
    queues it until its transcription (or failure) is done. Pipecat 1.14 transcribes queued
    segments one at a time in a background task (``_segment_queue``). A service that writes its
    own ``run_stt`` (the Parakeet sidecar's) is counted the same way."""

    _transcribing = 0
    _segments_started = 0  # segments taken from the queue (run_stt called), in order

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("run_stt")
        if own is not None and not getattr(own, "counts_segments", False):
            cls.run_stt = _counted(own)

    @property
    def audio_in_flight(self) -> bool:
        queue = getattr(self, "_segment_queue", None)
        return self._transcribing > 0 or (queue is not None and not queue.empty())

    @property
    def segments_ended(self) -> int:
        """Segments queued so far (each at a VAD stop), transcribed or still waiting."""
        queue = getattr(self, "_segment_queue", None)
        return self._segments_started + (queue.qsize() if queue is not None else 0)

    @_counted
    def run_stt(self, audio: bytes):
        return super(SegmentInFlight, self).run_stt(audio)

"""Whether an STT service still has the caller's audio in flight (heard, not yet transcribed).

The empty-turn watchdog (``agent.turns``) asks this before it closes a caller turn that no
transcript ended: an STT slower than real time (Whisper on a busy CPU) is still working on the
turn, and its transcript is on its way. :class:`SegmentInFlight` gives pipecat's segmented
services (Whisper, the Parakeet sidecar) the ``audio_in_flight`` property; the streaming
Nemotron service has its own.
"""

from __future__ import annotations

from typing import Any


def audio_in_flight(stt: Any) -> bool:
    """What the service says; a service that cannot tell is taken to have nothing in flight."""
    return bool(getattr(stt, "audio_in_flight", False))


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
        try:
            async for frame in super().run_stt(audio):
                yield frame
        finally:
            self._transcribing -= 1

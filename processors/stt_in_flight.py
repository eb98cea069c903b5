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
    """Mixin for a ``SegmentedSTTService``: a segment is in flight from the VAD stop that hands
    it over until its transcription (or failure) is done."""

    _segments_in_flight = 0

    @property
    def audio_in_flight(self) -> bool:
        return self._segments_in_flight > 0

    async def _handle_user_stopped_speaking(self, frame):
        self._segments_in_flight += 1
        try:
            await super()._handle_user_stopped_speaking(frame)
        finally:
            self._segments_in_flight -= 1

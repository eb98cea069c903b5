"""The first sentence of an answer that is still held: synthesized ahead, played only if confirmed.

With preemptive generation (:mod:`agent.preempt`) the LLM starts answering while the caller's turn
is still open, and pipecat's speculation gate holds the answer in the LLM service until the turn
ends. The TTS sits behind the gate, so without help it starts on the first sentence only when the
turn is confirmed: the server's time to first audio (~107 ms for the reference's Chatterbox) comes
on top of every answer.

:class:`FirstSentence` watches the held text in the LLM service, cut into sentences the way the
TTS cuts them (pipecat's own ``SimpleTextAggregator``), and gives the first whole one once;
the LLM pushes it as a :class:`TTSPrefetchFrame`, a system frame, so it passes the gate at once.
The TTS starts the request and buffers the audio, and plays nothing: its audio reaches the
pipeline only when the released answer asks the TTS for that same sentence. An answer withdrawn
or interrupted drops the prefetch (closing its request); so does a newer prefetch, or one not
asked for within a bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipecat.frames.frames import SystemFrame
from pipecat.utils.text.simple_text_aggregator import SimpleTextAggregator

_SPACE = re.compile(r"\s+")


def sentence_key(text: str) -> str:
    """What two renderings of a sentence share (spacing aside): the prefetch is matched on it."""
    return _SPACE.sub(" ", text).strip()


@dataclass
class TTSPrefetchFrame(SystemFrame):
    """Synthesize this sentence ahead and hold its audio: it may be asked for shortly."""

    text: str = ""

    def __str__(self) -> str:
        return f"{self.name}(chars: {len(self.text)})"  # the words are the family's: never logged


class FirstSentence:
    """The first whole sentence of a stream of LLM tokens, once, as the TTS would cut it."""

    def __init__(self) -> None:
        self._aggregator = SimpleTextAggregator()
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    async def feed(self, token: str) -> str | None:
        """The first sentence when this token completes it; ``None`` before and after."""
        if self._done:
            return None
        async for aggregation in self._aggregator.aggregate(token):
            if aggregation.text.strip():
                self._done = True
                return aggregation.text
        return None

    def flush(self) -> str | None:
        """At the end of the answer: its only sentence, when no sentence end came before it."""
        if self._done:
            return None
        self._done = True
        return self._aggregator.text.text or None

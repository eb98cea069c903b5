"""The demo's checks judge what the caller heard: an answer is the LLM's words after her question
was heard, audible at her ear; a request to repeat (sound, but no LLM text) is not one.

:meth:`agent.demo.simulate.CallScript._answered` on a real :class:`CallLog` filled as the
pipeline's frames would fill it, and a line whose ear heard sound until a given time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

import agent.demo.simulate as simulate
from agent.demo.simulate import CallLog, CallScript


class Ear:
    """The line, as far as the checks read it: when sound last reached the caller's ear."""

    def __init__(self, last_loud: float | None):
        self.last_loud = last_loud

    def sink_last_loud(self, before: float | None = None, after: float | None = None) -> float | None:
        return self.last_loud if after is None or (self.last_loud or 0) > after else None


def judged(*, heard: bool, llm_text: bool, sound_after_s: float | None) -> float | None:
    log = CallLog()
    asked = time.monotonic()
    if heard:
        log.transcripts.append((asked + 0.5, "final", "What is the weather like today?"))
    if llm_text:
        log.by_kind["llm_text"].append(asked + 0.8)
    ear = Ear(asked + 0.8 + sound_after_s if sound_after_s is not None else None)
    script = CallScript(ear, log, barge_in=True)
    return asyncio.run(script._answered(("weather",), asked))


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
    monkeypatch.setattr(simulate, "ANSWER_TIMEOUT_S", 0.2)


@pytest.mark.parametrize("heard, llm_text, sound_after_s, answered", [
    (True, True, 1.0, True),  # heard, the LLM answered, and the caller heard it
    (True, False, 1.0, False),  # sound but no LLM words: a request to repeat is not an answer
    (False, True, 1.0, False),  # the question was never heard: whatever played answered nothing
    (True, True, None, False),  # the LLM answered but nothing reached the ear
    (True, True, 0.1, False),  # ... or less than a moment of it
])
def test_an_answer_is_the_llm_s_words_after_the_question_audible_at_the_ear(heard, llm_text, sound_after_s, answered):
    assert (judged(heard=heard, llm_text=llm_text, sound_after_s=sound_after_s) is not None) is answered

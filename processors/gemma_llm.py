"""Gemma over an OpenAI-compatible streaming chat API, with a spoken apology on failure.

Pipecat's ``OpenAILLMService`` streams the completion and closes the HTTP request when an
interruption cancels it. On top of it this service:

- sends no ``developer`` messages (Gemma's chat template knows only user and model turns);
- bounds how long a completion may stall (connect and between-token timeouts), with one retry
  for a connection that failed before any token;
- while pipecat's speculation gate holds an answer started ahead of the caller's turn end
  (preemptive generation), sends its first sentence to the TTS to be synthesized ahead
  (:mod:`processors.prefetch`); it is played only if the answer is released;
- when a completion fails (server down, HTTP error, stall, connection dropped mid-stream) it
  logs the failure, reports an ``ErrorFrame`` upstream as pipecat does, and streams a short
  apology downstream in place of the answer, so the caller is never left in silence. The call
  goes on; the next turn tries the server again.
"""

from __future__ import annotations

import asyncio

import httpx
from loguru import logger
from openai import AsyncOpenAI
from pipecat.frames.frames import ErrorFrame, Frame, LLMContextFrame, LLMFullResponseEndFrame, LLMTextFrame
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.openai.llm import OpenAILLMService

from processors.prefetch import FirstSentence, TTSPrefetchFrame


_SENTENCE_ENDS = (".", "!", "?", "…")


class GemmaLLMService(OpenAILLMService):
    """An OpenAI-compatible LLM (Gemma on llama.cpp, vLLM or Ollama) that apologises on failure."""

    supports_developer_role = False

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str,
        system_prompt: str,
        apology: str,
        temperature: float = 0.6,
        max_tokens: int = 200,
        timeout_s: float = 8.0,
        prefetch_first_sentence: bool = True,
        **kwargs,
    ):
        self._timeout_s = timeout_s
        self._apology = apology
        self._in_completion = False
        self._apologised = False
        self._answer_tail = ""  # the end of this completion's text so far
        self._prefetch_first_sentence = prefetch_first_sentence
        self._first_sentence = FirstSentence()
        self._warm_up_task: asyncio.Task | None = None
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            settings=OpenAILLMService.Settings(
                model=model,
                system_instruction=system_prompt,
                temperature=temperature,
                max_tokens=max_tokens,
            ),
            **kwargs,
        )

    def create_client(self, api_key=None, base_url=None, **kwargs) -> AsyncOpenAI:
        # Bounded timeouts: a stalled server must turn into an apology, not into silence.
        timeout = httpx.Timeout(self._timeout_s, connect=min(2.0, self._timeout_s))
        return AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=1,
            http_client=httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=4)),
        )

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, LLMContextFrame):
            self._in_completion, self._apologised, self._answer_tail = True, False, ""
            self._first_sentence = FirstSentence()
            try:
                await super().process_frame(frame, direction)
            finally:
                self._in_completion = False
        else:
            await super().process_frame(frame, direction)

    async def push_error_frame(self, error: ErrorFrame, force_treat_as_permanent: bool = False):
        await super().push_error_frame(error, force_treat_as_permanent=force_treat_as_permanent)
        if self._in_completion and not self._apologised:
            # Still inside the completion: the apology lands before LLMFullResponseEndFrame,
            # so the TTS speaks it as this turn's answer.
            self._apologised = True
            logger.warning(f"{self}: completion failed ({error.error}); speaking an apology")
            # End the broken sentence first, so the TTS does not join the apology to it.
            cut = self._answer_tail.strip() and not self._answer_tail.rstrip().endswith(_SENTENCE_ENDS)
            await self.push_frame(LLMTextFrame(("... " if cut else " ") + self._apology))

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        if isinstance(frame, LLMTextFrame) and self._in_completion:
            self._answer_tail = (self._answer_tail + frame.text)[-80:]
            if self._held_ahead():
                await self._prefetch(await self._first_sentence.feed(frame.text))
        elif isinstance(frame, LLMFullResponseEndFrame) and self._held_ahead():
            await self._prefetch(self._first_sentence.flush())
        await super().push_frame(frame, direction)

    def _held_ahead(self) -> bool:
        """Whether this answer is one started ahead of the turn's end, held until it is confirmed."""
        return self._prefetch_first_sentence and self._speculation_gate.is_speculating

    async def _prefetch(self, sentence: str | None) -> None:
        if sentence:
            # A system frame: it passes the gate at once, ahead of the held answer.
            await super().push_frame(TTSPrefetchFrame(text=sentence))

    async def start(self, frame):
        await super().start(frame)
        # The first request of a process pays for the client's set-up (connection, response
        # types): ~0.3 s on an idle 2-core box, ~2 s on a busy one. Pay it at start, not on the
        # caller's first question.
        self._warm_up_task = self.create_task(self._warm_up(), "warm_up")

    async def _warm_up(self) -> None:
        try:
            await self._client.models.list()
            logger.debug(f"{self}: LLM server answered the warm-up request")
        except Exception as e:  # noqa: BLE001 - a server still starting is fine: the first turn connects again
            logger.debug(f"{self}: warm-up request failed ({type(e).__name__}); the first turn will connect")

    async def _stop_warm_up(self) -> None:
        task, self._warm_up_task = self._warm_up_task, None
        if task is not None and not task.done():
            await self.cancel_task(task)

    async def stop(self, frame):
        await self._stop_warm_up()
        await super().stop(frame)
        await self._client.close()

    async def cancel(self, frame):
        await self._stop_warm_up()
        await super().cancel(frame)
        await self._client.close()

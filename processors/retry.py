"""Bounded retries for the HTTP services (the Chatterbox TTS, the Parakeet sidecar).

A request that failed in a way trying again may fix (a refused connection, a 5xx, a timeout) is
retried a fixed number of times after a fixed pause, each try logged once; anything else, or the
last failure, goes to the caller of the service as it is.
"""

from __future__ import annotations

import asyncio

from loguru import logger
from pipecat.utils.errors import ErrorCategory


class ServiceRequestError(Exception):
    """One request to a server failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool, category: ErrorCategory):
        super().__init__(message)
        self.retryable = retryable
        self.category = category


class Retries:
    """The retries left for one request: ``retries`` more tries, ``delay_s`` apart."""

    def __init__(self, owner: object, retries: int, delay_s: float):
        if retries < 0:
            raise ValueError(f"{type(owner).__name__}: retries must be 0 or more")
        self._owner = owner
        self._retries = retries
        self._delay_s = delay_s
        self._done = 0

    async def again(self, error: ServiceRequestError) -> bool:
        """After ``error``: True (having paused) when the request should be tried again."""
        if not error.retryable or self._done >= self._retries:
            return False
        self._done += 1
        logger.warning(f"{self._owner}: {error}; will retry ({self._done}/{self._retries})")
        await asyncio.sleep(self._delay_s)
        return True

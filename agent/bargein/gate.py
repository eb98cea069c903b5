"""The caller-voice gate's rules: is the sound that paused Annie the caller's voice? Pure numpy.

The caller is enrolled during the call from her own speech while Annie is silent (what the
caller says then is hers, or the call is not working anyway): her first ``min_enroll_s`` of
clean speech make the enrolment, and every later turn refines it (a running mean that weighs the
latest turns most, so a caller who moves to the speakerphone is followed, not locked out).
Annie is enrolled from her own TTS audio. A sound is then scored against both (cosine of unit
embeddings):

- clearly not the caller: it scores at most ``not_caller_max`` against her, or is nearer Annie's
  voice than hers by ``annie_margin`` (her echo) -> ``NOT_CALLER``;
- clearly the caller: at least ``caller_min`` -> ``CALLER``;
- anything else, or no enrolment yet, or no embedding (silence, too short) -> ``UNSURE``.

The decision core (:meth:`agent.bargein.core.BargeInCore.voice_verdict`) resumes Annie on
``NOT_CALLER`` and keeps today's rules otherwise, so the gate can only make a decision earlier.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


class Verdict(Enum):
    CALLER = "caller"
    NOT_CALLER = "not_caller"
    UNSURE = "unsure"


@dataclass(frozen=True)
class GateParams:
    min_enroll_s: float = 3.0  # CALLER_GATE_MIN_ENROLL_MS
    caller_min: float = 0.75  # CALLER_GATE_CALLER_MIN
    not_caller_max: float = 0.50  # CALLER_GATE_NOT_CALLER_MAX
    annie_margin: float = 0.15  # fixed: a sound this much nearer Annie's voice is her echo
    refine_weight: float = 0.2  # fixed: how much one later turn moves the caller's enrolment

    @classmethod
    def from_settings(cls, settings) -> GateParams:
        return cls(min_enroll_s=settings.caller_gate_min_enroll_ms / 1000, caller_min=settings.caller_gate_caller_min,
                   not_caller_max=settings.caller_gate_not_caller_max)


@dataclass(frozen=True)
class Scored:
    verdict: Verdict
    caller: float | None = None  # cosine against the caller's enrolment
    annie: float | None = None  # and against Annie's voice


class _Enrolment:
    def __init__(self) -> None:
        self.vector: np.ndarray | None = None
        self.seconds = 0.0
        self._sum: np.ndarray | None = None

    def add(self, embedding: np.ndarray, seconds: float, min_seconds: float, refine_weight: float) -> None:
        if self.seconds < min_seconds:  # still enrolling: the duration-weighted mean
            self._sum = embedding * seconds if self._sum is None else self._sum + embedding * seconds
            mean = self._sum
        else:  # enrolled: follow the voice, latest turns weigh most
            mean = (1 - refine_weight) * self.vector + refine_weight * embedding
        self.seconds += seconds
        self.vector = mean / np.linalg.norm(mean)

    def ready(self, min_seconds: float) -> bool:
        return self.vector is not None and self.seconds >= min_seconds


class CallerGate:
    """Enrolments of the caller and of Annie, and the verdict on a sound."""

    def __init__(self, params: GateParams | None = None):
        self.params = params or GateParams()
        self._caller = _Enrolment()
        self._annie = _Enrolment()

    @property
    def enrolled(self) -> bool:
        return self._caller.ready(self.params.min_enroll_s)

    @property
    def caller_seconds(self) -> float:
        return self._caller.seconds

    def enroll_caller(self, embedding: np.ndarray | None, seconds: float) -> None:
        if _usable(embedding):
            self._caller.add(embedding, seconds, self.params.min_enroll_s, self.params.refine_weight)

    def enroll_annie(self, embedding: np.ndarray | None, seconds: float) -> None:
        if _usable(embedding):
            self._annie.add(embedding, seconds, self.params.min_enroll_s, self.params.refine_weight)

    def verdict(self, embedding: np.ndarray | None) -> Scored:
        if not self.enrolled or not _usable(embedding):
            return Scored(Verdict.UNSURE)
        p = self.params
        caller = float(embedding @ self._caller.vector)
        annie = float(embedding @ self._annie.vector) if self._annie.vector is not None else None
        if caller <= p.not_caller_max or (annie is not None and annie - caller >= p.annie_margin):
            return Scored(Verdict.NOT_CALLER, caller, annie)
        if caller >= p.caller_min:
            return Scored(Verdict.CALLER, caller, annie)
        return Scored(Verdict.UNSURE, caller, annie)


def _usable(embedding: np.ndarray | None) -> bool:
    return embedding is not None and embedding.ndim == 1 and bool(np.all(np.isfinite(embedding))) and \
        abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-3

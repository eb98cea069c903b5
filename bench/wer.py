"""Word error rate on normalised text, counted by jiwer (a maintained WER library).

Both sides are normalised the same way before they are compared: :func:`normalize` (the default)
lowercases, folds accents, turns hyphens and slashes into spaces and drops punctuation except
apostrophes inside words; numbers are left as written, so a reference that spells "twenty" and a
hypothesis that writes "20" differ. ``normalizer="whisper"`` uses Whisper's English normaliser
(the ``whisper_normalizer`` package, installed with NeMo), which also standardises numbers and
spellings, as the Open ASR leaderboard does: use it on real sets with numbers in them.

A corpus's WER is its errors over its reference words (not a mean of per-utterance rates).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jiwer

NORMALIZERS = ("basic", "whisper")


def normalize(text: str) -> str:
    """Lowercase words without punctuation: "Hello, Annie's mother-in-law!" -> "hello annie's mother in law"."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[\u2018\u2019\u02bc`]", "'", text)
    text = re.sub(r"[-\u2010-\u2015/]", " ", text)
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    text = re.sub(r"(?<![a-z0-9])'+|'+(?![a-z0-9])", " ", text)  # quotes, not apostrophes
    return " ".join(text.split())


def normalizer(name: str = "basic") -> Callable[[str], str]:
    """The text normaliser called ``name`` (one of :data:`NORMALIZERS`)."""
    if name == "basic":
        return normalize
    if name == "whisper":
        try:
            from whisper_normalizer.english import EnglishTextNormalizer
        except ImportError as e:
            raise ValueError("--normalizer whisper needs the whisper_normalizer package (pip install whisper-normalizer)") from e
        english = EnglishTextNormalizer()
        return lambda text: " ".join(english(text).split())
    raise ValueError(f"unknown normalizer {name!r}: allowed values are {', '.join(NORMALIZERS)}")


@dataclass(frozen=True)
class WordErrors:
    """Word alignment counts of hypotheses against references."""

    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def reference_words(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Errors per reference word (can exceed 1 with many insertions); NaN without reference words."""
        return self.errors / self.reference_words if self.reference_words else float("nan")

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(self.hits + other.hits, self.substitutions + other.substitutions,
                          self.deletions + other.deletions, self.insertions + other.insertions)


def word_errors(reference: str, hypothesis: str, norm: Callable[[str], str] = normalize) -> WordErrors:
    """Align one hypothesis with its reference after normalising both."""
    ref, hyp = norm(reference), norm(hypothesis)
    if not ref:
        return WordErrors(insertions=len(hyp.split()))
    if not hyp:
        return WordErrors(deletions=len(ref.split()))
    out = jiwer.process_words(ref, hyp)
    return WordErrors(out.hits, out.substitutions, out.deletions, out.insertions)


def corpus_errors(pairs: Iterable[tuple[str, str]], norm: Callable[[str], str] = normalize) -> WordErrors:
    """Summed counts over (reference, hypothesis) pairs; ``.wer`` is the corpus WER."""
    total = WordErrors()
    for reference, hypothesis in pairs:
        total = total + word_errors(reference, hypothesis, norm)
    return total

"""Words as the echo guard and the barge-in decision compare them."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9']+")


def words_of(text: str) -> list[str]:
    """Lower-case words, punctuation dropped ("Mm-hm, okay!" -> ["mm", "hm", "okay"])."""
    return _WORD.findall(text.lower())

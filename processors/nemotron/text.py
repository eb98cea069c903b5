"""A turn's transcript text on the fast path, extended by its new tokens instead of re-decoded.

NeMo 3.0's ``decode_tokens_to_str_with_strip_punctuation(ids)`` is three pure steps: ids ->
pieces (``decode_ids_to_tokens``: one piece per id), pieces -> raw text
(``decode_tokens_to_str``: ``''.join`` for character labels, SentencePiece's ``decode_pieces``
for BPE), and a regex that deletes a whitespace character before a punctuation mark. Re-running
it at every step costs time in proportion to the turn's length, for every stream that got a
token (at 1,024 streams, a third of the host time of a step). :class:`TextDecoder` extends the
text by the new tokens only, with the same NeMo calls:

* pieces: looked up per id (the mapping is element-wise);
* raw text: the new pieces are decoded behind an *anchor*, a vocabulary piece with visible text,
  no word-start marker and not a byte: ``T(old + new) == T(old) + T([anchor] + new)[len(T([anchor])):]``.
  This holds once the old text has a visible character (SentencePiece drops a word-start space
  only at the start of the text) and does not end in a byte piece (consecutive byte pieces form
  one character); otherwise the turn's raw text is decoded whole;
* punctuation: the regex matches a whitespace character and one punctuation character, so the
  raw text cut after a non-whitespace character can be substituted in two parts; only the part
  after the last visible character is substituted again.

At construction the decoder compares itself with NeMo's full decode on pseudo-random id sequences
of the model's vocabulary fed a few tokens at a time; where anything differs (another tokenizer,
another NeMo) it decodes the whole turn at every step, as before.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from loguru import logger

__all__ = ["TextDecoder", "TurnText"]

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_WORD_START = "\u2581"  # SentencePiece's word-start marker


def _mark(match: re.Match) -> str:
    """NeMo's replacement ``r"\2"`` (the punctuation mark without the whitespace before it), as a
    function: ``re`` then skips parsing the template at every call."""
    return match.group(2)


@dataclass(slots=True)
class TurnText:
    """The decoding state of one stream's turn (reset with the turn)."""

    raw: str = ""  # decode_tokens_to_str of every piece so far
    visible: bool = False  # raw holds a non-whitespace character
    byte_tail: bool = False  # the last piece is a byte piece
    done: str = ""  # punctuation-stripped raw[:cut]
    cut: int = 0  # raw[cut - 1] is not whitespace (or cut is 0)


class TextDecoder:
    """Turn text from token ids, equal to ``decoding.decode_tokens_to_str_with_strip_punctuation``."""

    def __init__(self, decoding, *, check_sequences: int = 6):
        self._full = decoding.decode_tokens_to_str_with_strip_punctuation
        self.incremental = False
        self.reason = ""
        try:
            self._setup(decoding)
            self.reason = self._self_check(int(decoding.blank_id), check_sequences)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
            self.reason = f"{type(e).__name__}: {e}"
        self.incremental = not self.reason
        if not self.incremental:
            logger.info(f"ASR text decoded whole at every step (incremental decoding not usable: {self.reason})")

    def text(self, state: TurnText | None, tokens: list[int], new: list[int]) -> tuple[TurnText | None, str]:
        """The turn's text after ``new`` tokens were appended (``tokens`` includes them) and its new state."""
        if not self.incremental:
            return None, self._full(tokens)
        return self._extend(state, tokens, new)

    # ----- internals ------------------------------------------------------------------------

    def _extend(self, state: TurnText | None, tokens: list[int], new: list[int]) -> tuple[TurnText, str]:
        state = TurnText() if state is None else state
        pieces = self._pieces_of(new)
        if state.visible and not state.byte_tail:
            state.raw += self._join([self._anchor, *pieces])[self._anchor_len :]
        else:
            state.raw = self._join(self._pieces_of(tokens))
            state.done, state.cut = "", 0  # the raw text may have changed, not just grown
            state.visible = not state.raw.isspace() and bool(state.raw)
        if pieces:
            state.byte_tail = _BYTE_PIECE.fullmatch(pieces[-1]) is not None
        return state, self._strip_punctuation(state)

    def _setup(self, decoding) -> None:
        self._to_pieces = decoding.decode_ids_to_tokens
        self._join = decoding.decode_tokens_to_str
        self._memo: dict[int, tuple[str, ...]] = {}
        punctuation = decoding.supported_punctuation
        self._pattern = decoding.space_before_punct_pattern if punctuation else None
        # One character each, none of them whitespace: a match is exactly "\s" + one mark.
        self._split_ok = all(isinstance(p, str) and len(p) == 1 and not p.isspace() for p in punctuation or ())
        self._anchor = self._find_anchor(int(decoding.blank_id))
        self._anchor_len = len(self._join([self._anchor]))

    def _pieces_of(self, ids: list[int]) -> list[str]:
        memo = self._memo
        try:
            return [piece for t in ids for piece in memo[t]]
        except KeyError:
            for t in ids:
                if t not in memo:
                    memo[t] = tuple(self._to_pieces([t]))
            return [piece for t in ids for piece in memo[t]]

    def _find_anchor(self, vocab: int) -> str:
        for i in range(vocab):
            pieces = self._pieces_of([i])
            if len(pieces) != 1:
                continue
            piece = pieces[0]
            text = self._join([piece])
            if (
                text
                and not any(c.isspace() for c in text)
                and not piece.startswith(_WORD_START)
                and not _BYTE_PIECE.fullmatch(piece)
                and not (self._pattern is not None and self._pattern.search(" " + text))
                and self._join([piece, piece]) == text + text
            ):
                return piece
        raise ValueError("no anchor piece (visible text, no word-start marker, not a byte, not punctuation)")

    def _strip_punctuation(self, state: TurnText) -> str:
        if self._pattern is None:
            return state.raw
        if not self._split_ok:
            return self._pattern.sub(r"\2", state.raw)
        cut = len(state.raw.rstrip())
        if cut > state.cut:
            state.done += self._pattern.sub(_mark, state.raw[state.cut : cut])
            state.cut = cut
        # raw[cut:] is whitespace, where the pattern (whitespace, then a mark that is not) cannot match
        return state.done + state.raw[state.cut :]

    def _self_check(self, vocab: int, sequences: int) -> str:
        """'' when the incremental text equals the full decode on test sequences, else why not."""
        rng = random.Random(1234)
        ids = list(range(vocab))
        # Ids whose pieces hold spaces, punctuation, word starts or bytes, drawn more often.
        tricky = [i for i in ids if self._tricky(i)] or ids
        for n in range(sequences):
            tokens: list[int] = []
            state = None
            while len(tokens) < 48:
                new = [rng.choice(tricky if rng.random() < 0.5 else ids) for _ in range(rng.randint(0 if n else 1, 4))]
                tokens.extend(new)
                state, text = self._extend(state, tokens, new) if new else (state, self._full(tokens))
                if text != self._full(tokens):
                    return f"differs from the full decode after {len(tokens)} tokens"
        return ""

    def _tricky(self, i: int) -> bool:
        pieces = self._pieces_of([i])
        text = self._join(list(pieces)) if pieces else ""
        return (
            not pieces
            or any(p.startswith(_WORD_START) or _BYTE_PIECE.fullmatch(p) for p in pieces)
            or any(c.isspace() for c in text)
            or (self._pattern is not None and self._pattern.search(" " + text) is not None)
        )

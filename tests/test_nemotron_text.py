"""The fast path's incremental transcript text equals NeMo's full decode of the turn's tokens.

Two real NeMo decodings: the tiny test model's character labels (with an apostrophe, which NeMo
counts as punctuation) and a byte-fallback SentencePiece BPE tokenizer trained here on a few
sentences (word-start pieces, punctuation, bytes, control and unknown pieces), as the real
nemotron model's tokenizer is SentencePiece BPE. Tokens arrive a few at a time, as from the steps
of a turn; the text after every arrival must be the full decode of all tokens so far.
"""

from __future__ import annotations

import copy
import random

import pytest

from processors.nemotron.text import TextDecoder
from bench.nemo_models import build_model

CORPUS = (
    "Hello, world! It's a test. Don't stop: we'll see; really? Yes... The quick brown fox jumps over "
    'the lazy dog. Numbers 1, 2, 3 and "quotes" (parens) - dashes. Uber cafe naive resume.\n'
)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


@pytest.fixture(scope="module")
def bpe_decoding(tiny, tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    from nemo.collections.asr.parts.submodules.rnnt_decoding import RNNTBPEDecoding
    from nemo.collections.common.tokenizers import SentencePieceTokenizer

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text(CORPUS * 20 + "東京 は 大きい です。\n")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "bpe"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, minloglevel=2,
    )
    tokenizer = SentencePieceTokenizer(str(folder / "bpe.model"))
    tokenizer.tokenizer.vocab_size = len(tokenizer.vocab)  # as NeMo's ASR BPE mixin sets it
    return RNNTBPEDecoding(copy.deepcopy(tiny.cfg.decoding), tiny.decoder, tiny.joint, tokenizer)


def turns(vocab: int, favoured: list[int], seed: int, count: int = 200, steps: int = 30):
    """Token arrivals of ``count`` turns: lists of 1-4 new ids, ``favoured`` ids drawn half the time."""
    rng = random.Random(seed)
    for _ in range(count):
        yield [[rng.choice(favoured) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(rng.randint(1, 4))] for _ in range(steps)]


def check_incremental(decoding, favoured: list[int], seed: int) -> int:
    """Asserts the incremental text equals the full decode at every arrival; returns how often a
    naive decoder (the new tokens decoded alone and appended) would have been wrong."""
    decoder = TextDecoder(decoding)
    assert decoder.incremental, decoder.reason
    full = decoding.decode_tokens_to_str_with_strip_punctuation
    naive_wrong = 0
    for arrivals in turns(int(decoding.blank_id), favoured, seed):
        tokens, state, naive = [], None, ""
        for new in arrivals:
            tokens += new
            state, text = decoder.text(state, tokens, new)
            expected = full(tokens)
            assert text == expected, (tokens, text, expected)
            naive += full(new)
            naive_wrong += naive != expected
    return naive_wrong


def test_incremental_text_equals_the_full_decode_for_character_labels(tiny):
    labels = tiny.decoding.labels_map
    favoured = [i for i, c in labels.items() if c in (" ", "'")]
    assert tiny.decoding.supported_punctuation == {"'"}  # a space before it is removed
    assert check_incremental(tiny.decoding, favoured, seed=1) > 0  # the apostrophe rule is exercised


def test_incremental_text_equals_the_full_decode_for_sentencepiece_bpe(bpe_decoding):
    pieces = bpe_decoding.tokenizer.ids_to_tokens(list(range(bpe_decoding.blank_id)))
    favoured = [i for i, p in enumerate(pieces) if p.startswith("<") or p.startswith("\u2581") or not p.isalnum()]
    assert any(p.startswith("<0x") for p in pieces) and bpe_decoding.supported_punctuation
    # Word starts (a space only after the first word) and bytes make the naive way wrong.
    assert check_incremental(bpe_decoding, favoured, seed=2) > 0


def test_a_decoding_the_rules_do_not_fit_is_decoded_whole(tiny):
    class Reversed(type(tiny.decoding)):
        def decode_tokens_to_str(self, tokens):  # not extendable at the end
            return "".join(tokens)[::-1]

    decoding = copy.copy(tiny.decoding)
    decoding.__class__ = Reversed
    decoder = TextDecoder(decoding)
    assert not decoder.incremental and "differs" in decoder.reason
    tokens = [1, 2, 0, 3]
    assert decoder.text(None, tokens, tokens[2:]) == (None, decoding.decode_tokens_to_str_with_strip_punctuation(tokens))

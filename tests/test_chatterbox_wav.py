"""The incremental WAV stream parser, fed the way a network delivers: in arbitrary pieces."""

from __future__ import annotations

import numpy as np
import pytest

from agent.demo.standins.tts_server import STREAM_DATA_SIZE, wav_header
from processors.chatterbox.wav import WavFormatError, WavStreamParser


def pcm(seconds: float, rate: int = 24000, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, int(seconds * rate), dtype=np.int16).tobytes()


def feed_in_pieces(data: bytes, sizes: list[int]) -> tuple[list[tuple[int, bytes]], WavStreamParser]:
    parser = WavStreamParser()
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out += parser.feed(data[pos : pos + size])
        pos, i = pos + size, i + 1
    out += parser.finish()
    return [(c.sample_rate, c.pcm) for c in out], parser


PIECES = [[1], [3], [7, 1, 44, 2], [1000], [1 << 20]]


@pytest.mark.parametrize("sizes", PIECES)
def test_one_open_ended_wav_yields_all_its_samples(sizes):
    audio = pcm(0.3)
    chunks, parser = feed_in_pieces(wav_header() + audio, sizes)
    assert b"".join(p for _, p in chunks) == audio
    assert all(rate == 24000 and len(p) % 2 == 0 for rate, p in chunks)
    assert parser.warnings == []


@pytest.mark.parametrize("sizes", PIECES)
def test_one_wav_per_sentence_back_to_back(sizes):
    first, second = pcm(0.2, seed=1), pcm(0.1, 16000, seed=2)
    data = wav_header(len(first)) + first + wav_header(len(second), rate=16000) + second
    chunks, parser = feed_in_pieces(data, sizes)
    assert b"".join(p for r, p in chunks if r == 24000) == first
    assert b"".join(p for r, p in chunks if r == 16000) == second
    assert parser.segments == 2 and parser.warnings == []


@pytest.mark.parametrize("sizes", PIECES)
def test_a_new_header_inside_an_open_ended_stream_starts_a_new_segment(sizes):
    first, second = pcm(0.2, seed=3), pcm(0.2, seed=4)
    data = wav_header(STREAM_DATA_SIZE) + first + wav_header(STREAM_DATA_SIZE) + second
    chunks, parser = feed_in_pieces(data, sizes)
    assert b"".join(p for _, p in chunks) == first + second
    assert parser.segments == 2


def test_whole_samples_go_out_at_once_and_a_split_sample_waits_for_its_second_byte():
    parser = WavStreamParser()
    assert parser.feed(wav_header()[:20]) == []
    assert [c.pcm for c in parser.feed(wav_header()[20:] + b"\x01\x02\x03")] == [b"\x01\x02"]
    assert [c.pcm for c in parser.feed(b"\x04")] == [b"\x03\x04"]


def test_first_sample_is_not_held_back():
    parser = WavStreamParser()
    chunks = parser.feed(wav_header() + b"\x01\x02")
    assert [c.pcm for c in chunks] == [b"\x01\x02"]


def test_an_odd_trailing_byte_is_dropped_with_a_warning():
    audio = pcm(0.05)
    chunks, parser = feed_in_pieces(wav_header() + audio + b"\x7f", [100])
    assert b"".join(p for _, p in chunks) == audio
    assert any("odd byte count" in w for w in parser.warnings)


def test_an_odd_declared_size_drops_the_last_byte_with_a_warning():
    audio = pcm(0.05) + b"\x7f"
    chunks, parser = feed_in_pieces(wav_header(len(audio)) + audio, [64])
    assert b"".join(p for _, p in chunks) == audio[:-1]
    assert any("odd byte count" in w for w in parser.warnings)


def test_a_header_with_extra_chunks_before_data_is_understood():
    audio = pcm(0.05)
    header = wav_header(len(audio))
    list_chunk = b"LIST" + (5).to_bytes(4, "little") + b"abcde\x00"  # odd size: padded
    data = header[:36] + list_chunk + header[36:] + audio
    chunks, parser = feed_in_pieces(data, [5])
    assert b"".join(p for _, p in chunks) == audio


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x13\x37" * 100, "expected a"),
        (b"RIFF\x00\x00\x00\x00WAVX" + b"\x00" * 40, "RIFF/WAVE"),
        (wav_header(bits=8), "16-bit mono"),
        (wav_header(channels=2), "16-bit mono"),
        (wav_header(audio_format=3), "16-bit mono"),
        (wav_header(rate=1000), "sample rate"),
        (b"RIFF\x00\x00\x00\x00WAVE" + b"data\xff\xff\xff\xff", "no fmt chunk"),
    ],
)
def test_bad_headers_are_rejected_with_a_reason(data, message):
    with pytest.raises(WavFormatError, match=message):
        WavStreamParser().feed(data)


def test_an_empty_answer_is_an_error():
    with pytest.raises(WavFormatError, match="no audio"):
        WavStreamParser().finish()


def test_an_answer_cut_inside_the_header_is_an_error():
    parser = WavStreamParser()
    parser.feed(wav_header()[:30])
    with pytest.raises(WavFormatError, match="before a complete WAV header"):
        parser.finish()


def test_audio_past_the_declared_size_keeps_playing_with_a_warning():
    first, extra = pcm(0.05, seed=5), pcm(0.05, seed=6)
    chunks, parser = feed_in_pieces(wav_header(len(first)) + first + extra, [333])
    assert b"".join(p for _, p in chunks) == first + extra
    assert any("past the size" in w for w in parser.warnings)

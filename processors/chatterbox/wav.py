"""Incremental parsing of the WAV streams Chatterbox servers send.

A server answers either one WAV whose data size is left open (``0xFFFFFFFF`` or ``0``) followed
by PCM for as long as it speaks, or one complete WAV per sentence, back to back. Bytes arrive in
network-sized pieces that cut anywhere (inside a header, inside a sample), so the parser keeps
what it cannot use yet and hands out only whole 16-bit samples, as soon as they arrive.

Only 16-bit mono PCM is accepted (what Chatterbox produces); anything else is a
:class:`WavFormatError`. Problems that leave the audio usable (a stray odd byte, a truncated
segment) are reported in :attr:`WavStreamParser.warnings` and the bad bytes are dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_OPEN_SIZES = (0, 0xFFFFFFFF)
_MAX_HEADER = 4096  # a header this long is not a header
_RIFF_SIGNATURE = 12  # b"RIFF" + size + b"WAVE"
_PCM_FORMATS = (1, 0xFFFE)  # WAVE_FORMAT_PCM, WAVE_FORMAT_EXTENSIBLE


class WavFormatError(ValueError):
    """The stream is not 16-bit mono PCM WAV; the message says what was found instead."""


@dataclass(frozen=True)
class PcmChunk:
    """Whole 16-bit samples of one WAV segment."""

    sample_rate: int
    pcm: bytes


class WavStreamParser:
    """Turns the bytes of one HTTP answer into :class:`PcmChunk` s, as they arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._in_header = True
        self._remaining: int | None = None  # data bytes left in this segment; None = open
        self._sample_rate = 0
        self.segments = 0
        self.warnings: list[str] = []

    def feed(self, data: bytes) -> list[PcmChunk]:
        """Parse more bytes; raise :class:`WavFormatError` if a header is wrong."""
        self._buffer.extend(data)
        chunks: list[PcmChunk] = []
        while self._buffer:
            if self._in_header:
                if not self._parse_header():
                    break
            elif not self._take_pcm(chunks):
                break
        return chunks

    def finish(self) -> list[PcmChunk]:
        """The answer ended: hand out what is left, dropping a stray odd byte with a warning."""
        chunks: list[PcmChunk] = []
        if self._in_header:
            if self.segments == 0:
                raise WavFormatError(
                    "the answer ended before a complete WAV header"
                    if self._buffer else "the answer had no audio at all"
                )
            if self._buffer:
                self.warnings.append(f"dropped {len(self._buffer)} byte(s) of a cut-off WAV header")
        else:
            if self._remaining:
                self.warnings.append(f"a WAV segment ended {self._remaining} byte(s) short of its size")
            usable = len(self._buffer) & ~1
            if usable:
                chunks.append(PcmChunk(self._sample_rate, bytes(self._buffer[:usable])))
            if len(self._buffer) % 2:
                self.warnings.append("odd byte count in 16-bit audio: dropped the last byte")
        self._buffer.clear()
        return chunks

    # -- internals -------------------------------------------------------------------------

    def _parse_header(self) -> bool:
        """Consume one WAV header; False if more bytes are needed."""
        buf = self._buffer
        if self.segments and not b"RIFF".startswith(bytes(buf[:4])):
            # Audio continues after a segment of declared size: keep playing it.
            self.warnings.append("audio continued past the size its WAV header declared")
            self._in_header, self._remaining = False, None
            return True
        if len(buf) < _RIFF_SIGNATURE:
            if not b"RIFF".startswith(bytes(buf[:4])):
                raise WavFormatError(f"expected a WAV header, got {bytes(buf[:4])!r}")
            return False
        if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
            raise WavFormatError(f"expected a RIFF/WAVE header, got {bytes(buf[:12])!r}")
        pos, fmt = _RIFF_SIGNATURE, None
        while True:
            if pos + 8 > len(buf):
                return self._need_more(pos)
            chunk_id, size = bytes(buf[pos : pos + 4]), struct.unpack_from("<I", buf, pos + 4)[0]
            if chunk_id == b"data":
                break
            if pos + 8 + size > len(buf):
                return self._need_more(pos + 8 + size)
            if chunk_id == b"fmt ":
                if size < 16:
                    raise WavFormatError(f"WAV fmt chunk of {size} bytes is too short")
                fmt = struct.unpack_from("<HHIIHH", buf, pos + 8)
            pos += 8 + size + (size & 1)
        if fmt is None:
            raise WavFormatError("WAV header has a data chunk but no fmt chunk")
        audio_format, channels, rate, _byte_rate, _block, bits = fmt
        if audio_format not in _PCM_FORMATS or bits != 16 or channels != 1:
            raise WavFormatError(
                f"expected 16-bit mono PCM, got format {audio_format}, {bits}-bit, {channels} channel(s)"
            )
        if not 8000 <= rate <= 192000:
            raise WavFormatError(f"implausible WAV sample rate {rate} Hz")
        del buf[: pos + 8]
        self._sample_rate = rate
        self._remaining = None if size in _OPEN_SIZES else size
        self._in_header = False
        self.segments += 1
        return True

    def _need_more(self, wanted: int) -> bool:
        if wanted > _MAX_HEADER:
            raise WavFormatError(f"WAV header longer than {_MAX_HEADER} bytes")
        return False

    def _take_pcm(self, chunks: list[PcmChunk]) -> bool:
        """Hand out the PCM in the buffer; False if the rest must wait for more bytes."""
        buf = self._buffer
        if self._remaining is not None:
            take = min(self._remaining, len(buf))
            end_of_segment = take == self._remaining
            usable = take & ~1
            if usable:
                chunks.append(PcmChunk(self._sample_rate, bytes(buf[:usable])))
            if end_of_segment:
                if take % 2:
                    self.warnings.append("odd byte count in 16-bit audio: dropped the last byte")
                del buf[:take]
                self._in_header, self._remaining = True, None
                return True
            del buf[:usable]
            self._remaining -= usable
            return False
        # Open-ended segment: a new header may start at any sample boundary.
        cut = _next_header(buf)
        usable = (len(buf) if cut is None else cut) & ~1
        if usable:
            chunks.append(PcmChunk(self._sample_rate, bytes(buf[:usable])))
            del buf[:usable]
        if cut is not None and _is_signature(buf):
            self._in_header = True
            return True
        return False


def _is_signature(buf: bytearray, at: int = 0) -> bool:
    return buf[at : at + 4] == b"RIFF" and buf[at + 8 : at + 12] == b"WAVE"


def _next_header(buf: bytearray) -> int | None:
    """Offset of the first (possible) WAV header at an even offset, or None.

    A possible header is a prefix of the signature at the end of the buffer, which is held back
    until the following bytes decide; at most 11 bytes wait that way.
    """
    at = buf.find(b"RIFF")
    while at != -1:
        if at % 2 == 0 and (_is_signature(buf, at) or len(buf) - at < _RIFF_SIGNATURE):
            return at
        at = buf.find(b"RIFF", at + 1)
    for at in range(max(0, len(buf) - 3), len(buf)):
        if at % 2 == 0 and b"RIFF".startswith(bytes(buf[at:])):
            return at
    return None

"""Feed one utterance of 16 kHz mono PCM to an STT service the way the live pipeline does.

VAD start, the audio in 20 ms InputAudioRawFrames, VAD stop; then the frames the service pushed.
Also: espeak-ng speech synthesized on the spot (nothing downloaded) and word-level comparison.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from io import BytesIO
from pathlib import Path

from pipecat.frames.frames import (
    ErrorFrame,
    InputAudioRawFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test

from agent.demo.stt_probe import word_overlap, words  # noqa: F401 - re-exported for the tests

RATE = 16000
CHUNK_BYTES = RATE // 50 * 2  # 20 ms of 16-bit mono


async def transcribe_utterance(service, pcm: bytes) -> tuple[list[TranscriptionFrame], list[ErrorFrame]]:
    """Run ``service`` on one utterance; return its transcripts (down) and errors (up)."""
    frames = [VADUserStartedSpeakingFrame(start_secs=0.2)]
    for i in range(0, len(pcm), CHUNK_BYTES):
        frames.append(InputAudioRawFrame(audio=pcm[i : i + CHUNK_BYTES], sample_rate=RATE, num_channels=1))
    frames.append(VADUserStoppedSpeakingFrame(stop_secs=0.2))
    down, up = await run_test(
        service,
        frames_to_send=frames,
        pipeline_params=PipelineParams(audio_in_sample_rate=RATE),
    )
    transcripts = [f for f in down if isinstance(f, TranscriptionFrame)]
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    return transcripts, errors


def espeak_pcm(text: str, tmp_path: Path, *, rate: int = RATE) -> bytes:
    """16-bit mono PCM of ``text`` spoken by espeak-ng, resampled by sox to ``rate``."""
    raw = tmp_path / "espeak.wav"
    out = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(out)], check=True)
    with wave.open(str(out), "rb") as w:
        return w.readframes(w.getnframes())


def have_speech_tools() -> bool:
    return bool(shutil.which("espeak-ng") and shutil.which("sox"))


def wav_info(wav: bytes) -> tuple[int, int, int, int]:
    """(sample rate, channels, sample width, frames) of a WAV file in memory."""
    with wave.open(BytesIO(wav), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


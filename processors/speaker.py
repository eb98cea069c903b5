"""Whose voice is it: speaker embeddings for the caller-voice gate (sync; no asyncio).

:class:`SpeakerEncoder` turns a stretch of 16 kHz speech into a unit vector: close vectors, the
same voice. By default the GE2E encoder that the PyPI package ``resemblyzer`` ships with its
weights (a 3-layer LSTM over 40 mel bands, 256 dimensions; ~0.1 s of CPU per second of audio);
``CALLER_GATE_MODEL`` names other weights of the same architecture in a local file. Nothing is
downloaded. The model is warmed up at load (its mel code compiles on first use).

Every stretch is brought to -30 dBFS first, as resemblyzer's own preprocessing does (the level
the encoder was trained at): without it a stretch shorter than the encoder's 1.6 s window, zero-
padded, scored by its level as much as by its voice. On real voices (LibriSpeech test-other, 10
speakers) that took the equal error rate at 0.6 s stretches from 0.36 to 0.19 and at 1.0 s from
0.31 to 0.12; on espeak-ng voices from 0.41 to 0.23 and 0.33 to 0.19 (``python -m
bench.caller_gate_bench [--voices DIR] [--band narrow]``; bench/README.md). Through the narrow
phone band the voices score closer together (0.28 / 0.24 on real voices): there the gate mostly
says "unsure". ``CALLER_GATE_MODEL`` is the way to a stronger encoder.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from processors.errors import SetupError

SAMPLE_RATE = 16000
MIN_SECONDS = 0.3  # shorter stretches give no embedding (the gate is then unsure)
MIN_LEVEL_DBFS = -55.0  # quieter than this is silence, not a voice
TARGET_DBFS = -30.0  # every stretch is brought to this level first (the encoder's training level)


class SpeakerEncoder:
    """Embeddings of 16 kHz int16 speech; ``None`` for what is too short, silent or broken."""

    def __init__(self, weights: Path | None = None, device: str = "cpu"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # webrtcvad's pkg_resources deprecation notice
                from resemblyzer import VoiceEncoder
        except ImportError as e:
            raise SetupError(
                "CALLER_GATE is on but the speaker encoder is not installed: pip install -e '.[gate]' "
                f"(resemblyzer), or set CALLER_GATE=0 ({e})."
            ) from e
        if weights is not None and not Path(weights).is_file():
            raise SetupError(f"CALLER_GATE_MODEL points to {str(weights)!r}, which is not a file of encoder weights.")
        from resemblyzer.audio import normalize_volume

        self._normalize = normalize_volume
        try:
            self._encoder = VoiceEncoder(device, verbose=False, weights_fpath=weights)
        except Exception as e:  # noqa: BLE001 - any load failure is the setting's fault
            raise SetupError(f"CALLER_GATE_MODEL {str(weights)!r} could not be loaded as GE2E encoder weights ({e}).") from e
        # Warm up (the mel code compiles now) on a thread of its own: embed() pins the thread it
        # runs on to one torch thread, and the caller's thread keeps its own setting.
        with ThreadPoolExecutor(max_workers=1) as warm:
            warm.submit(self.embed, np.zeros(SAMPLE_RATE, dtype=np.int16) + 1000).result()

    def embed(self, pcm: np.ndarray) -> np.ndarray | None:
        """The unit embedding of ``pcm`` (int16 or float in [-1, 1], 16 kHz mono)."""
        samples = np.asarray(pcm)
        audio = samples.astype(np.float32) / 32768 if samples.dtype == np.int16 else samples.astype(np.float32)
        if audio.ndim != 1 or audio.size < MIN_SECONDS * SAMPLE_RATE or not np.all(np.isfinite(audio)):
            return None
        rms = float(np.sqrt(np.mean(audio**2)))
        if rms <= 0 or 20 * np.log10(rms) < MIN_LEVEL_DBFS:
            return None
        # At the level the encoder was trained at (resemblyzer's own preprocessing normalizes every
        # utterance to -30 dBFS): a stretch shorter than its 1.6 s window is zero-padded, and at
        # another level the padding weighs differently, so the same voice at two levels (a caller
        # at -24 dBFS, her echo-cancelled words over Annie lower) scored as two voices.
        _one_torch_thread()
        embedding = self._encoder.embed_utterance(np.clip(self._normalize(audio, TARGET_DBFS), -1.0, 1.0))
        norm = float(np.linalg.norm(embedding))
        return embedding / norm if np.isfinite(norm) and norm > 0 else None


def _one_torch_thread() -> None:
    """Run the encoder's torch work on this thread alone. Under torch's OpenMP backend the number
    of intra-op threads belongs to the calling thread, so this binds only the gate's worker, which
    otherwise took every core (two on the dev box) from the audio threads for each embedding.
    (AEC3 losing the handset line's echo in the barge-in bench with the gate on was not this: the
    rig's echo bridge, starved while the encoder loaded, had moved the echo to 760 ms; fixed in
    ``transports/rig/echo_bridge.py``.)"""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)

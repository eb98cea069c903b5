"""The ASR WER bench (issue 25): WER on known pairs, the phone band, bad manifest lines, and the
whole bench on the tiny model and Whisper, and on a stand-in Parakeet sidecar."""

from __future__ import annotations

import json
import shutil
import wave

import numpy as np
import pytest
from aiohttp import web

from bench.asr_backends import first_right
from bench.asr_manifest import load_manifest
from bench.phone_band import phone_band
from bench.wer import WordErrors, corpus_errors, normalize, normalizer, word_errors

have_espeak = pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is needed to synthesize speech")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, Annie!", "hello annie"),
        ("Annie's mother-in-law", "annie's mother in law"),
        ("\u2018Quoted\u2019 caf\u00e9", "quoted cafe"),
        ("  and/or   THE end. ", "and or the end"),
        ("It's 20 past", "it's 20 past"),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    "reference, hypothesis, expected",
    [
        ("Hello, Annie.", "hello annie", WordErrors(hits=2)),
        ("the cat sat on the mat", "the cat sit on mat mat too", WordErrors(hits=4, substitutions=2, insertions=1)),
        ("call my daughter tomorrow", "call daughter tomorrow", WordErrors(hits=3, deletions=1)),
        ("call my daughter", "", WordErrors(deletions=3)),
        ("yes", "yes yes yes", WordErrors(hits=1, insertions=2)),
    ],
)
def test_word_errors_on_known_pairs(reference, hypothesis, expected):
    assert word_errors(reference, hypothesis) == expected


def test_wer_values():
    assert word_errors("yes", "yes yes yes").wer == 2.0  # insertions can take WER above 100 %
    assert word_errors("call my daughter", "").wer == 1.0


def test_corpus_wer_is_errors_over_all_reference_words_not_a_mean():
    total = corpus_errors([("a b c d", "a b c d"), ("x", "y")])
    assert (total.errors, total.reference_words) == (1, 5)
    assert total.wer == pytest.approx(0.2)  # the mean of per-utterance rates would be 0.5


def test_whisper_normalizer_standardises_spellings():
    pytest.importorskip("whisper_normalizer", reason="whisper_normalizer is not installed (it comes with NeMo)")
    assert word_errors("the colour is grey", "The color is gray.", normalizer("whisper")).errors == 0
    assert word_errors("the colour is grey", "The color is gray.").errors == 2


@pytest.mark.parametrize(
    "changes, final, expected",
    [
        ([(0.3, "hel"), (0.6, "Hello, Annie"), (0.9, "hello annie")], "hello annie", 0.6),
        ([(0.3, "hello annie"), (0.6, "hello"), (0.9, "hello annie")], "hello annie", 0.3),  # the first time
        ([(0.3, "hello"), (0.6, "hello ann")], "hello annie", None),  # never right before the final
        ([(0.3, "")], "", None),  # nothing to be right about
    ],
)
def test_when_the_partial_first_had_the_final_words(changes, final, expected):
    assert first_right(changes, final, normalize) == expected


def band_share(samples, low, high):
    power = np.abs(np.fft.rfft(samples)) ** 2
    freqs = np.fft.rfftfreq(samples.size, 1 / 16000)
    return power[(freqs >= low) & (freqs <= high)].sum() / power.sum()


def test_phone_band_keeps_the_length_and_removes_what_the_line_cannot_carry():
    noise = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    assert band_share(noise, 4000, 8000) > 0.4
    narrow, wide = phone_band(noise, "narrowband"), phone_band(noise, "wideband")
    assert narrow.shape == wide.shape == noise.shape and narrow.dtype == np.float32
    assert band_share(narrow, 300, 3400) > 0.95
    assert band_share(narrow, 3900, 8000) < 0.001
    assert band_share(wide, 300, 6500) > 0.8 and band_share(wide, 7600, 8000) < 0.01
    assert np.array_equal(phone_band(noise, "clean"), noise)
    with pytest.raises(ValueError, match="narrowband"):
        phone_band(noise, "landline")


def write_wav(path, seconds=0.5, rate=8000):
    t = np.arange(int(seconds * rate)) / rate
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def test_bad_manifest_lines_are_skipped_with_their_reasons(tmp_path):
    write_wav(tmp_path / "good.wav")
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    lines = [
        {"audio_filepath": "good.wav", "text": "a tone", "duration": 0.5},
        {"audio_filepath": str(tmp_path / "gone.wav"), "text": "missing"},
        {"audio_filepath": "garbage.wav", "text": "unreadable"},
        {"audio_filepath": "good.wav"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n\n")
    utterances, skipped = load_manifest(manifest)
    assert [u.key for u in utterances] == ["good.wav"]
    assert utterances[0].seconds == pytest.approx(0.5, abs=0.01)  # resampled from 8 kHz to 16 kHz
    assert [(s.line, s.name) for s in skipped] == [(2, "gone.wav"), (3, "garbage.wav"), (4, "good.wav"), (5, "line 5")]
    reasons = [s.reason for s in skipped]
    assert reasons[0].startswith("file not found") and reasons[1].startswith("unreadable audio")
    assert reasons[2] == "no reference text" and reasons[3].startswith("not JSON")


def test_a_librispeech_split_becomes_a_manifest(tmp_path):
    import soundfile

    from bench.asr_manifest import librispeech_manifest

    chapter = tmp_path / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    for key in ("1089-134686-0000", "1089-134686-0001"):
        soundfile.write(str(chapter / f"{key}.flac"), np.zeros(16000, dtype=np.int16), 16000)
    (chapter / "1089-134686.trans.txt").write_text("1089-134686-0000 HE HOPED THERE WOULD BE STEW\n1089-134686-0001 STUFF IT INTO YOU\n")
    utterances, skipped = load_manifest(librispeech_manifest(tmp_path / "test-clean", tmp_path / "ls.jsonl"))
    assert [(u.key, u.text, u.seconds) for u in utterances] == [
        ("1089-134686-0000.flac", "he hoped there would be stew", 1.0), ("1089-134686-0001.flac", "stuff it into you", 1.0)]
    assert skipped == []


@pytest.mark.parametrize("content", ["", "\n\n", json.dumps({"audio_filepath": "nowhere.wav", "text": "x"}) + "\n"])
def test_a_manifest_with_nothing_usable_is_one_sentence(tmp_path, content, capsys):
    from bench.asr_wer_bench import main

    manifest = tmp_path / "empty.jsonl"
    manifest.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--backends", "whisper"])
    message = str(exit_.value.code)
    assert message.startswith(f"The manifest {manifest} has no usable utterance") and message.count(". ") == 0
    assert not (tmp_path / "out").exists()  # no backend was loaded, nothing was written


@pytest.mark.slow
@have_espeak
def test_bench_end_to_end_on_the_tiny_model_and_whisper(tmp_path, capsys):
    pytest.importorskip("nemo.collections.asr", reason="NeMo is not installed (the asr extra)")
    pytest.importorskip("faster_whisper", reason="faster-whisper is not installed (the whisper extra)")
    from bench.asr_synth import SENTENCES, synthesize_manifest
    from bench.asr_wer_bench import main

    manifest = synthesize_manifest(tmp_path / "synth", count=2)
    lines = manifest.read_text().splitlines()
    lines.insert(1, json.dumps({"audio_filepath": "lost_call.wav", "text": "hello"}))
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    results = main(["--manifest", str(manifest), "--nemo", "tiny", "--chunks", "80,560", "--backends", "nemotron,whisper",
                    "--lines", "clean,narrowband", "--device", "cpu", "--out", str(out), "--label", "e2e"])

    words = sum(len(normalize(s).split()) for s in SENTENCES[:2])
    rows = {(r["backend"], r["line"]): r for r in results["rows"]}
    assert set(rows) == {(b, line) for b in ("nemotron 80 ms", "nemotron 560 ms", "whisper tiny.en") for line in ("clean", "narrowband")}
    assert all(r["n"] == 2 and r["reference_words"] == words and r["final_p50_ms"] > 0 for r in rows.values())
    assert all(r["partial_right_n"] is not None for r in rows.values() if r["kind"] == "nemotron")
    assert rows["whisper tiny.en", "clean"]["wer"] <= 0.25  # synthesized speech is easy for Whisper
    assert all(u["heard"] for r in rows.values() if r["kind"] == "nemotron" for u in r["utterances"])  # the tiny model emits
    assert [s["name"] for s in results["skipped"]] == ["lost_call.wav"]
    assert [s["backend"] for s in results["not_run"]] == []
    for suffix in (".json", ".md", ".png"):
        assert (out / f"e2e{suffix}").stat().st_size > 0
    assert "lost_call.wav" in (out / "e2e.md").read_text()
    printed = capsys.readouterr().out
    tail = printed[printed.index("== ASR_CHUNK_MS on a narrowband line"):]
    assert "tiny RANDOM model" in tail and "nemotron 80 ms" in tail and "whisper tiny.en" in tail
    assert "lost_call.wav (file not found)" in tail


class StandInSidecar:
    """The Parakeet sidecar's wire: a WAV in, {"text": ...} out (or HTTP 500 when ``fail``)."""

    def __init__(self, text: str, fail: bool = False):
        self.text, self.fail, self.seconds = text, fail, []

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        with wave.open(form["file"].file, "rb") as w:
            self.seconds.append(w.getnframes() / w.getframerate())
        if self.fail:
            return web.Response(status=500)
        return web.json_response({"text": self.text})


@pytest.mark.parametrize("fail", [False, True])
async def test_bench_against_a_parakeet_sidecar(tmp_path, monkeypatch, fail):
    from bench.asr_wer_bench import main

    write_wav(tmp_path / "a.wav", seconds=0.75, rate=16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav", "text": "Call my daughter, please."}) + "\n")
    sidecar = StandInSidecar("call my daughter please", fail=fail)
    app = web.Application()
    app.router.add_post("/transcribe", sidecar.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    monkeypatch.setenv("PARAKEET_URL", f"http://127.0.0.1:{port}/transcribe")
    try:
        import asyncio

        results = await asyncio.to_thread(main, ["--manifest", str(manifest), "--backends", "parakeet", "--lines", "narrowband",
                                                 "--out", str(tmp_path / "out")])
    finally:
        await runner.cleanup()
    (row,) = results["rows"]
    assert row["backend"] == "parakeet sidecar" and row["n"] == 1
    assert sidecar.seconds and all(s == pytest.approx(0.75, abs=0.01) for s in sidecar.seconds)
    if fail:
        assert row["failed"] == 1 and row["wer"] == 1.0 and "HTTP 500" in row["utterances"][0]["error"]
    else:
        assert row["failed"] == 0 and row["wer"] == 0.0

"""The caller-voice gate: only the caller interrupts Annie.

The rules are tables on unit vectors; the encoder runs on real speech (espeak-ng voices, and
Annie's Piper voice where installed) with resemblyzer's shipped weights; the tap is fed frames as
the pipeline would.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from agent.bargein.gate import CallerGate, GateParams, Verdict
from agent.bargein.gate_taps import AnnieVoice, CallerVoiceTap, GateWorker
from tests.doubles import SPEAKER_DIM as DIM
from tests.doubles import ToneSpeakerEncoder, tone_frames
from tests.doubles import unit_vector as unit


CALLER = unit(1)
ANNIE = unit(2, near=CALLER, cos=0.45)


def enrolled_gate() -> CallerGate:
    gate = CallerGate(GateParams(min_enroll_s=3.0))
    gate.enroll_caller(CALLER, 3.5)
    gate.enroll_annie(ANNIE, 4.0)
    return gate


@pytest.mark.parametrize(
    "sound, verdict",
    [
        (unit(3, near=CALLER, cos=0.9), Verdict.CALLER),  # her voice
        (unit(4, near=CALLER, cos=0.65), Verdict.UNSURE),  # a short stretch of it: the rules decide
        (unit(5, near=CALLER, cos=0.45), Verdict.NOT_CALLER),  # the TV, another person
        (unit(6, near=ANNIE, cos=0.95), Verdict.NOT_CALLER),  # Annie's echo
        (None, Verdict.UNSURE),  # silence, or too short to embed
        (np.full(DIM, np.nan), Verdict.UNSURE),
        (np.zeros(DIM), Verdict.UNSURE),
    ],
    ids=["caller", "unsure", "other-voice", "annie-echo", "no-embedding", "nan", "zero"],
)
def test_the_verdict_table(sound, verdict):
    assert enrolled_gate().verdict(sound).verdict is verdict


def test_no_verdict_before_enough_of_the_callers_voice():
    gate = CallerGate(GateParams(min_enroll_s=3.0))
    gate.enroll_caller(CALLER, 2.0)
    assert not gate.enrolled and gate.verdict(unit(5, near=CALLER, cos=0.1)).verdict is Verdict.UNSURE
    gate.enroll_caller(unit(7, near=CALLER, cos=0.95), 1.5)
    assert gate.enrolled


def test_a_caller_who_changes_her_sound_is_followed_not_locked_out():
    """She moves to the speakerphone: her voice now scores 0.6 against the enrolment (unsure, so
    the usual rules still decide: never locked out). Each turn she takes while Annie is silent
    refines the enrolment, and a few turns later her new sound is recognised as hers."""
    gate = enrolled_gate()
    speakerphone = unit(8, near=CALLER, cos=0.6)
    assert gate.verdict(speakerphone).verdict is Verdict.UNSURE
    for turn in range(8):
        gate.enroll_caller(unit(100 + turn, near=speakerphone, cos=0.97), 2.0)
    assert gate.verdict(speakerphone).verdict is Verdict.CALLER


def test_the_thresholds_come_from_the_settings(make_settings):
    params = GateParams.from_settings(make_settings(caller_gate_min_enroll_ms=5000, caller_gate_caller_min=0.8,
                                                    caller_gate_not_caller_max=0.5))
    assert (params.min_enroll_s, params.caller_min, params.not_caller_max) == (5.0, 0.8, 0.5)


def test_overlapping_thresholds_stop_start_up():
    from agent.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="^Setting CALLER_GATE_NOT_CALLER_MAX is invalid: must be below"):
        load_settings(stt_backend="whisper", caller_gate_caller_min=0.5, caller_gate_not_caller_max=0.6)


# --- the encoder on real voices -------------------------------------------------------------

SENTENCES = [
    "Hello, is that you? I wanted to ask about dinner tonight.",
    "Could you tell me what time the doctor comes tomorrow?",
    "I think I left my glasses in the kitchen again.",
    "Wait, stop please, I have a question for you.",
    "No, that is not what I asked you at all.",
]


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("resemblyzer", reason="the speaker encoder (the gate extra: resemblyzer) is not installed")
    from processors.speaker import SpeakerEncoder

    return SpeakerEncoder()


def speech(text: str, voice: str) -> np.ndarray:
    from transports.rig.audio import synth_speech

    return synth_speech(text, 16000, voice=voice)


needs_espeak = pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (the voices)")


@needs_espeak
def test_on_real_voices_the_caller_passes_and_others_do_not(encoder):
    """Enrolled from three sentences, the caller's other sentences are hers; a clearly different
    voice is not; and voices of the same synthesizer close to hers (espeak-ng's male variants,
    0.5-0.7 against her here) are never taken for hers: unsure at worst, so the usual rules decide."""
    gate = CallerGate(GateParams(min_enroll_s=3.0))
    for text in SENTENCES[:3]:
        pcm = speech(text, "en-us+f3")
        gate.enroll_caller(encoder.embed(pcm), len(pcm) / 16000)
    assert gate.enrolled
    for text in SENTENCES[3:]:
        assert gate.verdict(encoder.embed(speech(text, "en-us+f3"))).verdict is Verdict.CALLER
        assert gate.verdict(encoder.embed(speech(text, "en-us+whisper"))).verdict is Verdict.NOT_CALLER
        for other in ("en-us+m1", "en-gb+m1", "de+m2"):
            assert gate.verdict(encoder.embed(speech(text, other))).verdict is not Verdict.CALLER, other


@needs_espeak
def test_annies_own_voice_is_not_the_caller(encoder):
    from agent.demo.standins.piper_server import PiperSynthesizer, joe_voice_path, piper_available

    if not piper_available():
        pytest.skip("Piper (the demo extra) is not installed: no voice of Annie's to test with")
    import soxr

    piper = PiperSynthesizer(joe_voice_path())

    def annie(text: str) -> np.ndarray:
        return soxr.resample(np.frombuffer(piper.speak(text), dtype=np.int16), 24000, 16000).astype(np.int16)

    gate = CallerGate(GateParams(min_enroll_s=3.0))
    for text in SENTENCES[:3]:
        pcm = speech(text, "en-us+f3")
        gate.enroll_caller(encoder.embed(pcm), len(pcm) / 16000)
    gate.enroll_annie(encoder.embed(annie(SENTENCES[0] + " " + SENTENCES[1])), 6.0)
    assert gate.verdict(encoder.embed(annie(SENTENCES[4]))).verdict is Verdict.NOT_CALLER


def test_bad_audio_is_no_embedding_never_an_exception(encoder):
    rng = np.random.default_rng(0)
    assert encoder.embed(np.zeros(16000, dtype=np.int16)) is None  # silence
    assert encoder.embed(rng.integers(-3000, 3000, 320).astype(np.int16)) is None  # 20 ms
    assert encoder.embed(np.full(16000, np.nan, dtype=np.float32)) is None
    clipped = np.clip(rng.standard_normal(16000) * 40000, -32768, 32767).astype(np.int16)
    embedding = encoder.embed(clipped)  # clipping: distorted, still a sound
    assert embedding is None or abs(np.linalg.norm(embedding) - 1) < 1e-3
    assert CallerGate().verdict(embedding).verdict is Verdict.UNSURE  # nobody enrolled yet


# --- the tap -------------------------------------------------------------------------------------


class Strategy:
    def __init__(self):
        self.verdicts: list[bool] = []

    async def gate_verdict(self, not_caller: bool) -> None:
        self.verdicts.append(not_caller)


async def test_the_tap_enrols_while_annie_is_silent_and_scores_while_she_speaks():
    """The judge as barge-in drives it (the pipeline's VAD, each job awaited in line): only "not
    the caller" reaches the start strategy."""
    gate = CallerGate(GateParams(min_enroll_s=1.0))
    strategy = Strategy()
    judge = CallerVoiceTap(GateWorker(ToneSpeakerEncoder(), gate), strategy, score_s=0.6).judge

    async def utterance(tone_hz: float, seconds: float) -> None:
        for frame in tone_frames(0, 0.4):  # quiet before it (what the preroll keeps)
            assert judge.audio(frame) is None
        judge.voice_started()
        for frame in tone_frames(tone_hz, seconds):
            if (job := judge.audio(frame)) is not None:
                await job
        if (job := judge.voice_stopped()) is not None:
            await job

    # The caller speaks while Annie is silent: enrolment, no verdict.
    await utterance(200, 1.5)
    assert gate.enrolled and not judge.verdicts
    # Annie speaks; the TV starts: scored after 0.6 s (once), not the caller -> the strategy is told.
    judge.bot_speaking = True
    await utterance(900, 1.0)
    assert strategy.verdicts == [True] and [s.verdict for s in judge.verdicts] == [Verdict.NOT_CALLER]
    # The caller herself while Annie speaks: scored, and the rules go on deciding.
    await utterance(200, 1.0)
    assert strategy.verdicts == [True] and judge.verdicts[-1].verdict is Verdict.CALLER
    # A sound over Annie shorter than score_s is scored at its VAD stop, on what there is.
    await utterance(900, 0.4)
    assert strategy.verdicts == [True, True] and len(judge.verdicts) == 3
    # Speech that began while Annie spoke is never taken for the caller's enrolment.
    seconds = gate.caller_seconds
    judge.voice_started()
    judge.bot_speaking = False
    await judge.voice_stopped()  # scored on what there is (the preroll), not enrolled
    assert gate.caller_seconds == seconds and len(judge.verdicts) == 4


async def test_annie_is_enrolled_from_her_first_seconds_at_the_tts_rate():
    gate = CallerGate()
    annie = AnnieVoice(GateWorker(ToneSpeakerEncoder(), gate), enroll_s=1.0)
    jobs = [annie.heard(frame, 24000) for frame in tone_frames(300, 1.2, rate=24000)]
    due = [job for job in jobs if job is not None]
    assert len(due) == 1 and jobs.index(due[0]) == 49  # at 1.0 s of her speech, once
    await due[0]
    assert gate.verdict(ToneSpeakerEncoder.OTHER).verdict is Verdict.UNSURE  # the caller is not enrolled yet
    gate.enroll_caller(ToneSpeakerEncoder.CALLER, 3.5)
    assert gate.verdict(ToneSpeakerEncoder.OTHER).annie == pytest.approx(1.0)  # Annie's enrolment is what she said


def test_an_encoder_that_cannot_load_stops_start_up_with_one_sentence(tmp_path, monkeypatch, make_settings):
    from agent.services import build_speaker_encoder
    from processors.errors import SetupError

    with pytest.raises(SetupError, match="^CALLER_GATE_MODEL points to .*, which is not a file"):
        build_speaker_encoder(make_settings(enable_barge_in=True, caller_gate=True, caller_gate_model=tmp_path / "missing.pt"))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not torch weights")
    with pytest.raises(SetupError, match="could not be loaded"):
        build_speaker_encoder(make_settings(enable_barge_in=True, caller_gate=True, caller_gate_model=broken))
    monkeypatch.setitem(__import__("sys").modules, "resemblyzer", None)  # as if the gate extra were missing
    with pytest.raises(SetupError, match="^CALLER_GATE is on but the speaker encoder is not installed"):
        build_speaker_encoder(make_settings(enable_barge_in=True, caller_gate=True))
    assert build_speaker_encoder(make_settings(enable_barge_in=True)) is None  # off by default
    assert build_speaker_encoder(make_settings(enable_barge_in=False, caller_gate=True)) is None


@needs_espeak
def test_the_gate_bench_reads_a_folder_of_real_recordings(encoder, tmp_path):
    """``bench.caller_gate_bench --voices DIR`` (LibriSpeech's layout, SPEAKERS.TXT for the sexes):
    each speaker is the caller in turn, the others (same sex first) are the TV and the second voice."""
    import json

    import soundfile

    from bench import caller_gate_bench

    speakers = {"11": ("en-us+f3", "F"), "22": ("en-gb+f2", "F"), "33": ("en-us+m1", "M")}
    for name, (voice, _) in speakers.items():
        (tmp_path / name).mkdir()
        for i, text in enumerate(SENTENCES[:5] + SENTENCES[:2]):
            soundfile.write(tmp_path / name / f"{name}-{i}.wav", speech(text, voice), 16000)
    (tmp_path / "SPEAKERS.TXT").write_text(";ID | SEX\n" + "\n".join(f"{n} | {s} | test" for n, (_, s) in speakers.items()))
    voices = caller_gate_bench.CorpusVoices(tmp_path, "wide")
    assert voices.callers == ["11", "22", "33"] and voices._others("11") == ["22", "33"]
    assert caller_gate_bench.main(["--voices", str(tmp_path), "--quick", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / f"caller_gate_wide_{tmp_path.name}.json").read_text())
    scores = result["summary"]["0.6s"]["scores"]
    assert scores["caller"]["n"] == 4 and scores["other voice"]["n"] == 4 and scores["caller+tv"]["n"] == 16

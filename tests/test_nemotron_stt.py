"""NemotronStreamingSTTService in a real Pipecat pipeline with the tiny random NeMo model (CPU).

Every expected transcript is computed by NeMo's whole-utterance pass over exactly the audio the
turn should contain, so these tests check which audio reached the model, not fixed strings.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    MetricsFrame,
    TranscriptionFrame,
    UserMuteStartedFrame,
    UserMuteStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import run_test

from processors.nemotron.engine import NemotronStreamingEngine
from processors.nemotron.stt import NemotronStreamingSTTService
from processors.stt_in_flight import segment_of
from bench.nemo_models import offline_text, speechlike, tiny_nemo_once

FRAME = 320  # 20 ms at 16 kHz
PREROLL_MS = 300


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_nemo_once(tmp_path_factory.mktemp("nemo"))


@pytest.fixture(scope="module")
def engine(model_path) -> NemotronStreamingEngine:
    return NemotronStreamingEngine.load(model_path, 160, "cpu")


def pcm_frames(seconds: float, seed: int) -> list[np.ndarray]:
    pcm = np.round(speechlike(int(seconds * 16000), seed=seed) * 32767).astype(np.int16)
    return [pcm[i : i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME)]


def audio(frames: list[np.ndarray]) -> list[InputAudioRawFrame]:
    return [InputAudioRawFrame(f.tobytes(), 16000, 1) for f in frames]


def expected_final(engine, frames: list[np.ndarray]) -> str:
    """What the turn must say: NeMo offline over exactly these samples plus the final padding."""
    pad = np.zeros(16 * engine.final_pad_ms, dtype=np.int16)
    text, _ = offline_text(engine.model, np.concatenate([*frames, pad]) / 32768.0)
    assert text.strip(), "choose audio whose reference is not empty"
    return text


def turn(before: list[np.ndarray], speech: list[np.ndarray]) -> list:
    """Frames of one caller turn: audio before the VAD start, the VAD start, speech, the stop."""
    return [*audio(before), VADUserStartedSpeakingFrame(), *audio(speech), VADUserStoppedSpeakingFrame(stop_secs=0.2)]


def preroll(frames: list[np.ndarray]) -> list[np.ndarray]:
    return frames[-(PREROLL_MS // 20) :]


def transcripts(frames) -> tuple[list[str], list[list[str]]]:
    """Final texts, and for each final the interim texts that came before it."""
    finals, interims, current = [], [], []
    for f in frames:
        if isinstance(f, TranscriptionFrame):
            assert f.finalized
            finals.append(f.text)
            interims.append(current)
            current = []
        elif isinstance(f, InterimTranscriptionFrame):
            current.append(f.text)
    assert not current, "interim transcripts after the last final"
    return finals, interims


async def test_partials_then_one_final_per_turn_and_reset_between_turns(engine):
    gap1, speech1 = pcm_frames(1.0, seed=1), pcm_frames(1.6, seed=2)
    gap2, speech2 = pcm_frames(0.8, seed=3), pcm_frames(1.2, seed=4)
    stt = NemotronStreamingSTTService(engine=engine, preroll_ms=PREROLL_MS)
    down, _ = await run_test(stt, frames_to_send=turn(gap1, speech1) + turn(gap2, speech2))
    finals, interims = transcripts(down)
    assert finals == [
        expected_final(engine, preroll(gap1) + speech1),
        expected_final(engine, preroll(gap2) + speech2),  # nothing of turn 1 leaks into turn 2
    ]
    for final, partials in zip(finals, interims):
        assert partials, "no partial transcript before the final"
        assert len(set(partials)) == len(partials), "a partial was repeated without a change"
        assert all(final.startswith(p) for p in partials)
    passed = [f for f in down if isinstance(f, InputAudioRawFrame)]
    assert len(passed) == len(gap1 + speech1 + gap2 + speech2)  # audio still flows downstream
    # Each final is marked with its segment (the VAD stops so far), for the barge-in decision.
    assert [segment_of(f) for f in down if isinstance(f, TranscriptionFrame)] == [1, 2]
    assert stt.segments_ended == 2


async def test_half_duplex_mute_drops_audio_and_resets_the_stream(engine):
    echo, after = pcm_frames(1.0, seed=5), pcm_frames(0.6, seed=6)
    speech = pcm_frames(1.4, seed=7)
    frames = [
        UserMuteStartedFrame(),
        *turn([], echo),  # the bot's own voice while muted: must never be transcribed
        UserMuteStoppedFrame(),
        *turn(after, speech),
    ]
    stt = NemotronStreamingSTTService(engine=engine, preroll_ms=PREROLL_MS)
    down, _ = await run_test(stt, frames_to_send=frames)
    finals, _ = transcripts(down)
    assert finals == [expected_final(engine, preroll(after) + speech)]


async def test_ungated_stream_covers_all_audio_since_unmute(engine):
    heard_while_muted, first, second = pcm_frames(0.8, 8), pcm_frames(1.3, 9), pcm_frames(0.9, 10)
    frames = [
        UserMuteStartedFrame(),
        *audio(heard_while_muted),
        UserMuteStoppedFrame(),
        *audio(first),
        VADUserStoppedSpeakingFrame(stop_secs=0.2),
        *audio(second),
        VADUserStoppedSpeakingFrame(stop_secs=0.2),
    ]
    stt = NemotronStreamingSTTService(engine=engine, vad_gated=False)
    down, _ = await run_test(stt, frames_to_send=frames)
    finals, _ = transcripts(down)
    # Without VAD gating the VAD stop alone finalizes; the mute still drops what it covered.
    assert finals == [expected_final(engine, first), expected_final(engine, second)]


async def test_mute_frames_travelling_upstream_are_honoured(engine):
    """The user aggregator broadcasts the mute frames, so the STT also sees them going upstream."""
    echo, speech = pcm_frames(0.8, seed=11), pcm_frames(1.0, seed=12)
    stt = NemotronStreamingSTTService(engine=engine, vad_gated=False)
    frames = [UserMuteStartedFrame(), *audio(echo), UserMuteStoppedFrame(), *audio(speech), VADUserStoppedSpeakingFrame(stop_secs=0.2)]
    down, up = await run_test(stt, frames_to_send=frames, frames_to_send_direction=FrameDirection.UPSTREAM)
    assert [type(f) for f in up if isinstance(f, (UserMuteStartedFrame, UserMuteStoppedFrame))] == [
        UserMuteStartedFrame,
        UserMuteStoppedFrame,
    ]
    assert transcripts(down)[0] == [expected_final(engine, speech)]


class FlakyEngine(NemotronStreamingEngine):
    """The real engine, with one step that fails like a CUDA out-of-memory error."""

    fail_next_step = False

    def step(self, states):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().step(states)


async def test_a_failing_step_loses_the_turn_not_the_call(model_path, engine):
    flaky = FlakyEngine.load(model_path, 160, "cpu")
    flaky.fail_next_step = True
    speech1, gap, speech2 = pcm_frames(1.0, 13), pcm_frames(0.5, 14), pcm_frames(1.2, 15)
    stt = NemotronStreamingSTTService(engine=flaky, preroll_ms=PREROLL_MS)
    down, up = await run_test(stt, frames_to_send=turn([], speech1) + turn(gap, speech2))
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and not errors[0].fatal and "out of memory" in errors[0].error
    assert stt.is_usable
    finals, _ = transcripts(down)
    assert finals == [expected_final(engine, preroll(gap) + speech2)]  # turn 1 is lost, turn 2 works


async def test_ttfb_metric_measures_speech_end_to_final(engine):
    stt = NemotronStreamingSTTService(engine=engine, preroll_ms=PREROLL_MS)
    frames = turn(pcm_frames(0.4, 16), pcm_frames(1.0, 17))
    frames[-1] = VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time())
    down, _ = await run_test(stt, frames_to_send=frames, pipeline_params=PipelineParams(enable_metrics=True))
    final_at = next(i for i, f in enumerate(down) if isinstance(f, TranscriptionFrame))
    before_final = down[final_at - 1]  # the base class reports TTFB as the final goes out
    assert isinstance(before_final, MetricsFrame)
    ttfb = [d.value for d in before_final.data if isinstance(d, TTFBMetricsData)]
    assert len(ttfb) == 1 and ttfb[0] >= 0.2  # measured from the estimated end of speech


class SlowFinalEngine(NemotronStreamingEngine):
    """The real engine, its final 0.3 s slow (a busy box): long enough to look at in between."""

    def finalize(self, stream):
        time.sleep(0.3)
        return super().finalize(stream)


async def test_words_are_in_flight_from_the_vad_stop_until_the_final(model_path):
    """What the adaptive hold waits for (``words_in_flight``): the turn's final, not the steps
    over audio (those are ``audio_in_flight``), and no longer once the final is pushed."""
    slow = SlowFinalEngine.load(model_path, 160, "cpu", warm_up=False)
    stt = NemotronStreamingSTTService(engine=slow, preroll_ms=PREROLL_MS)
    probe = _Look(lambda: (stt.words_in_flight, stt.audio_in_flight))
    await run_test(Pipeline([stt, probe]), frames_to_send=turn(pcm_frames(0.4, 20), pcm_frames(1.0, 21)))
    seen = {kind: [w for k, w in probe.seen if k is kind] for kind in (VADUserStoppedSpeakingFrame, TranscriptionFrame)}
    assert seen[VADUserStoppedSpeakingFrame] == [(True, True)], "the final is on its way"
    assert [words for words, _ in seen[TranscriptionFrame]] == [False], "the final, as it arrives, leaves nothing in flight"
    assert stt.words_in_flight is False
    # Audio with no VAD stop: steps in flight, never words.
    stt = NemotronStreamingSTTService(engine=slow, vad_gated=False)
    probe = _Look(lambda: (stt.words_in_flight, stt.audio_in_flight))
    await run_test(Pipeline([stt, probe]), frames_to_send=audio(pcm_frames(1.0, 22)))
    looks = [w for k, w in probe.seen if k is InputAudioRawFrame]
    assert looks and any(a for _, a in looks), "the steps were seen in flight"
    assert not any(w for w, _ in looks), "steps over audio are not words in flight"


class _Look(FrameProcessor):
    """Notes ``look()`` as each downstream frame arrives."""

    def __init__(self, look):
        super().__init__()
        self._look, self.seen = look, []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.seen.append((type(frame), self._look()))
        await self.push_frame(frame, direction)


class GatedEngine(NemotronStreamingEngine):
    """The real engine whose steps wait until the test says every audio frame got through."""

    released = threading.Event()
    waited_out = False

    def step(self, states):
        if not self.released.wait(timeout=10):
            GatedEngine.waited_out = True
        return super().step(states)


async def test_audio_keeps_flowing_while_the_model_is_busy(model_path, engine):
    gated = GatedEngine.load(model_path, 160, "cpu", warm_up=False)
    speech = pcm_frames(1.5, 18)
    probe = _ReleaseAfterAudio(len(speech), GatedEngine.released)
    stt = NemotronStreamingSTTService(engine=gated, vad_gated=False)
    down, _ = await run_test(Pipeline([stt, probe]), frames_to_send=[*audio(speech), VADUserStoppedSpeakingFrame(stop_secs=0.2)])
    assert not GatedEngine.waited_out, "audio frames were held up behind a model step"
    assert transcripts(down)[0] == [expected_final(engine, speech)]


async def test_warns_when_audio_waits_longer_than_allowed(engine):
    warnings = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        stt = NemotronStreamingSTTService(engine=engine, vad_gated=False, lag_warning_s=0.3)
        await run_test(stt, frames_to_send=audio(pcm_frames(2.0, 19)))  # 2 s arrive at once
        relaxed = NemotronStreamingSTTService(engine=engine, vad_gated=False, lag_warning_s=30)
        await run_test(relaxed, frames_to_send=audio(pcm_frames(2.0, 19)))
    finally:
        logger.remove(sink)
    behind = [w for w in warnings if "falling behind real time" in w]
    assert len(behind) == 1 and str(stt) in behind[0]


# ----- small pipeline helpers ---------------------------------------------------------------


class _ReleaseAfterAudio(FrameProcessor):
    """Opens the engine's gate once all audio frames have passed the STT."""

    def __init__(self, expected: int, gate: threading.Event):
        super().__init__()
        self._left, self._gate = expected, gate

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame) and frame.audio:
            self._left -= 1
            if self._left == 0:
                self._gate.set()
        await self.push_frame(frame, direction)

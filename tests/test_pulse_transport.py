"""PulseAudioTransport on the real rig: capture, playback, flush, outages, start-up errors.

A pipeline ``[transport.input(), Tap, transport.output()]`` runs under a real ``WorkerRunner``
against a private PulseAudio daemon (``transports.rig.pulse``). Measured figures are printed
(``pytest -s``); assertions are on what a caller or the pipeline would notice.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest
from pipecat.frames.frames import ErrorFrame, InputAudioRawFrame, InterruptionFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from processors.errors import SetupError
from transports.pulse import PulseAudioParams, PulseAudioTransport
from transports.rig.pulse import PulseRig, pulseaudio_available
from tests.recording_waits import LOUD_DBFS, loud_at, loud_then_quiet, recorded_past, wait_for
from transports.rig.audio import rms_dbfs, synth_speech, tone

pytestmark = pytest.mark.skipif(
    not pulseaudio_available(), reason="pulseaudio/pactl not installed (apt-get install pulseaudio pulseaudio-utils)"
)

IN_RATE, OUT_RATE = 16000, 24000


class Tap(FrameProcessor):
    """Records captured audio frames (with arrival time) and errors; passes everything on."""

    def __init__(self):
        super().__init__()
        self.audio: list[tuple[float, InputAudioRawFrame]] = []
        self.errors: list[ErrorFrame] = []

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self.audio.append((time.monotonic(), frame))
            return
        if isinstance(frame, ErrorFrame):
            self.errors.append(frame)
        await self.push_frame(frame, direction)

    def captured(self, start: float, end: float = float("inf")) -> list[InputAudioRawFrame]:
        return [f for t, f in list(self.audio) if start < t <= end]

    def loud_frames(self, start: float, end: float = float("inf")) -> list[InputAudioRawFrame]:
        return [f for f in self.captured(start, end) if rms_dbfs(pcm(f)) > LOUD_DBFS]


def pcm(frame) -> np.ndarray:
    return np.frombuffer(frame.audio, dtype=np.int16)


def tts_frames(audio: np.ndarray, chunk_ms: int = 100) -> list[TTSAudioRawFrame]:
    """Audio as a TTS service would push it: chunks of ``chunk_ms`` at OUT_RATE."""
    step = OUT_RATE * chunk_ms // 1000
    return [
        TTSAudioRawFrame(audio[i : i + step].tobytes(), OUT_RATE, 1, context_id="utterance")
        for i in range(0, len(audio), step)
    ]


@asynccontextmanager
async def running(params: PulseAudioParams):
    """Run the transport in a pipeline; yields (worker, tap)."""
    transport = PulseAudioTransport(params)
    tap = Tap()
    worker = PipelineWorker(
        Pipeline([transport.input(), tap, transport.output()]),
        params=PipelineParams(audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE),
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        deadline = time.monotonic() + 5
        while not tap.audio and not tap.errors and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        yield worker, tap
    finally:
        await worker.cancel(reason="test over")
        await asyncio.wait_for(task, 10)


def rig_params(rig: PulseRig, **overrides) -> PulseAudioParams:
    values = dict(
        server=rig.server, source=rig.SOURCE, sink=rig.SINK,
        audio_in_enabled=True, audio_out_enabled=True,
        audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE,
    )
    values.update(overrides)
    return PulseAudioParams(**values)


async def played(playback) -> None:
    await asyncio.to_thread(playback.wait, 30)


async def captured_past(tap, t: float, timeout: float = 10.0) -> None:
    """Wait until the pipeline has received audio captured after monotonic time ``t``."""
    await wait_for(lambda: tap.captured(t), timeout, "capture to catch up")


@pytest.fixture(scope="module")
def rig():
    with PulseRig() as r:
        yield r


@pytest.fixture(scope="module")
def caller_speech() -> np.ndarray:
    return synth_speech("Hello Annie, can you hear me?", IN_RATE, voice="en-gb")


async def test_capture_delivers_the_callers_voice_in_real_time(rig, caller_speech):
    async with running(rig_params(rig)) as (_worker, tap):
        quiet_start = time.monotonic()
        await asyncio.sleep(1.0)
        quiet = tap.captured(quiet_start)
        playback = rig.play(caller_speech, IN_RATE)
        await played(playback)
        await captured_past(tap, playback.finished_at + 0.3)

    assert all(f.sample_rate == IN_RATE and f.num_channels == 1 and len(f.audio) == 640 for f in quiet)
    # 20 ms frames at the pace of the clock: about 50 per second, none lost or doubled.
    assert 40 <= len(quiet) <= 60, f"{len(quiet)} frames in one second"
    assert max(rms_dbfs(pcm(f)) for f in quiet) < LOUD_DBFS
    loud = tap.loud_frames(playback.started_at)
    loud_s = len(loud) * 0.02
    onset = next(t for t, f in tap.audio if t > playback.started_at and rms_dbfs(pcm(f)) > LOUD_DBFS)
    print(f"capture: {loud_s:.2f} s of voice captured for {playback.duration_s:.2f} s played, "
          f"first voice frame {1000 * (onset - playback.started_at):.0f} ms after playback began")
    assert 0.4 * playback.duration_s < loud_s < 1.2 * playback.duration_s
    captured_db = rms_dbfs(np.concatenate([pcm(f) for f in tap.captured(playback.started_at)]))
    assert captured_db > rms_dbfs(caller_speech) - 15


async def test_playback_reaches_the_speaker_at_the_right_pitch_and_length(rig):
    audio = tone(440, 1.5, OUT_RATE, -12)
    async with running(rig_params(rig)) as (worker, _tap):
        with rig.record(rig.SPEAKER_MONITOR) as speaker, rig.record("idle.monitor") as elsewhere:
            queued = time.monotonic()
            await worker.queue_frames(tts_frames(audio))
            await loud_then_quiet(speaker, queued)
    rec = speaker.recording
    first, last = rec.first_loud_time(LOUD_DBFS, queued), rec.last_loud_time(LOUD_DBFS, queued)
    assert first is not None, "nothing reached the speaker"
    heard = rec.between(first - 0.01, last)
    spectrum = np.abs(np.fft.rfft(heard * np.hanning(len(heard))))
    peak_hz = np.argmax(spectrum) * rec.sample_rate / len(heard)
    print(f"playback: first audio at the speaker {1000 * (first - queued):.0f} ms after queueing, "
          f"{last - first:.2f} s long, {peak_hz:.0f} Hz")
    assert abs(peak_hz - 440) < 5, "sample rate mismatch between the TTS audio and the sink"
    assert abs((last - first) - 1.5) < 0.15
    assert elsewhere.recording.last_loud_time(LOUD_DBFS) is None, "audio went to another sink"


async def test_interruption_silences_the_sink(rig):
    """Five seconds of speech queued; an interruption after one second stops it at the sink."""
    audio = tone(440, 5.0, OUT_RATE, -12)
    gaps_ms = []
    async with running(rig_params(rig)) as (worker, _tap):
        for _ in range(3):
            with rig.record(rig.SPEAKER_MONITOR) as speaker:
                queued = time.monotonic()
                await worker.queue_frames(tts_frames(audio))
                await recorded_past(speaker, await loud_at(speaker, queued) + 0.7)  # mid-sentence
                interrupted = time.monotonic()
                await worker.queue_frames([InterruptionFrame()])
                await recorded_past(speaker, interrupted + 1.0)
            rec = speaker.recording
            assert rec.first_loud_time(LOUD_DBFS) is not None
            last = rec.last_loud_time(LOUD_DBFS)
            gaps_ms.append(1000 * (last - interrupted))
            # Silence from then on: none of the four remaining seconds plays.
            tail = rec.between(interrupted + 0.3, float("inf"))
            assert len(tail) > 0.5 * rec.sample_rate
            assert rms_dbfs(tail) < -80, "Annie kept talking after the interruption"
    print(f"interruption to last audible 10 ms block at the sink: {[round(g) for g in gaps_ms]} ms")


async def test_source_vanishes_and_returns_mid_call(rig, caller_speech):
    async with running(rig_params(rig)) as (worker, tap):
        with rig.record(f"{rig.IDLE}.monitor") as elsewhere:
            rig.unload_echo_cancel()
            outage = time.monotonic()
            # PulseAudio would move our streams to the default (idle) devices: make that loud,
            # and keep Annie talking, to catch a transport that follows the fallback.
            noise = rig.play(tone(1000, 2.0, IN_RATE, -10), IN_RATE, device=rig.IDLE)
            cpu = time.process_time()
            await worker.queue_frames(tts_frames(tone(440, 1.5, OUT_RATE, -12)))
            await asyncio.sleep(2.0)
            cpu_during_outage = time.process_time() - cpu
            await played(noise)
            returning = time.monotonic()
            rig.load_echo_cancel()
            back = time.monotonic()
            await asyncio.sleep(0.3)
        annie_elsewhere = elsewhere.recording.between(outage, back)

        await wait_for(lambda: tap.captured(back), 5, "capture to resume")
        resumed = min(t for t, _ in tap.audio if t > returning)
        playback = rig.play(caller_speech, IN_RATE)
        await played(playback)
        await captured_past(tap, playback.finished_at + 0.3)
        with rig.record(rig.SPEAKER_MONITOR) as speaker:
            queued = time.monotonic()
            await worker.queue_frames(tts_frames(tone(440, 1.0, OUT_RATE, -12)))
            await loud_at(speaker, queued)

    during = tap.captured(outage + 0.1, returning)
    print(f"outage: {len(during)} frames pushed while the source was gone, capture back "
          f"{1000 * (resumed - returning):.0f} ms after it was reloaded, "
          f"{cpu_during_outage:.2f} s CPU in 2 s of outage")
    assert not [f for f in during if rms_dbfs(pcm(f)) > LOUD_DBFS], "captured the fallback device"
    assert len(during) < 10
    # Playback during the outage went nowhere: not to the fallback sink either (the 1 kHz noise is
    # there, Annie's 440 Hz tone must not be).
    spectrum = np.abs(np.fft.rfft(annie_elsewhere.astype(np.float64)))
    freq = np.fft.rfftfreq(len(annie_elsewhere), 1 / elsewhere.recording.sample_rate)
    assert spectrum[np.abs(freq - 440) < 20].max() < 0.01 * spectrum[np.abs(freq - 1000) < 20].max()
    assert cpu_during_outage < 1.0, "busy loop while the device is away"
    assert len(tap.loud_frames(playback.started_at)) * 0.02 > 0.4 * playback.duration_s
    assert speaker.recording.first_loud_time(LOUD_DBFS, queued) is not None, "playback did not resume"
    assert not tap.errors


async def test_server_restart_mid_call(rig, caller_speech):
    async with running(rig_params(rig)) as (worker, tap):
        with rig.record(rig.SPEAKER_MONITOR) as speaker:
            queued = time.monotonic()
            await worker.queue_frames(tts_frames(tone(440, 1.0, OUT_RATE, -12)))
            await loud_at(speaker, queued)  # the restart comes while Annie speaks
        await asyncio.to_thread(rig.restart_daemon, 0.5)
        back = time.monotonic()
        await wait_for(lambda: tap.captured(back), 10, "capture to resume after the restart")
        playback = rig.play(caller_speech, IN_RATE)
        await played(playback)
        await captured_past(tap, playback.finished_at + 0.3)
        with rig.record(rig.SPEAKER_MONITOR) as speaker:
            queued = time.monotonic()
            await worker.queue_frames(tts_frames(tone(440, 1.0, OUT_RATE, -12)))
            await loud_at(speaker, queued)
    assert len(tap.loud_frames(playback.started_at)) * 0.02 > 0.4 * playback.duration_s
    assert speaker.recording.first_loud_time(LOUD_DBFS, queued) is not None, "playback did not resume"
    assert not tap.errors


def test_no_server_is_a_clear_setup_error(tmp_path):
    params = PulseAudioParams(
        server=f"unix:{tmp_path}/native", audio_in_enabled=True, audio_out_enabled=True,
        audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE,
    )
    with pytest.raises(SetupError, match="PULSE_SERVER") as error:
        PulseAudioTransport(params).check_devices()
    assert str(tmp_path) in str(error.value)


def test_unknown_source_or_sink_names_the_setting(rig):
    with pytest.raises(SetupError, match=r"PULSE_SOURCE.*'phone_mic'.*echo_cancel_source"):
        PulseAudioTransport(rig_params(rig, source="phone_mic")).check_devices()
    with pytest.raises(SetupError, match=r"PULSE_SINK.*'phone_speaker'.*echo_cancel_sink"):
        PulseAudioTransport(rig_params(rig, sink="phone_speaker")).check_devices()


async def test_unknown_source_fails_the_pipeline_setup(rig):
    """Inside a pipeline the same SetupError surfaces as a fatal ErrorFrame, not a hang."""
    transport = PulseAudioTransport(rig_params(rig, source="phone_mic"))
    worker = PipelineWorker(
        Pipeline([transport.input(), transport.output()]),
        params=PipelineParams(audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE),
        idle_timeout_secs=None,
    )
    seen: list[ErrorFrame] = []

    @worker.event_handler("on_pipeline_error")
    async def _on_error(_worker, frame):
        seen.append(frame)

    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        await wait_for(lambda: seen, 10, "the setup error")
    finally:
        await worker.cancel(reason="test over")
        await asyncio.wait_for(task, 10)
    assert isinstance(seen[0].exception, SetupError)
    assert "PULSE_SOURCE" in str(seen[0].exception)

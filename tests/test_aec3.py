"""ECHO_CANCELLER=aec3: WebRTC AEC3 in process, fed with exactly what the sink played.

On a real PulseAudio rig whose echo path is a phone line (200 ms, speakerphone-loud, narrowband,
soft-clipped): the canceller removes at least 20 dB of Annie's echo once converged, and pausing,
resuming and flushing keep its reference in step (no echo burst after a resume or a flush). The
reference's timeline is checked on its own with a fake clock, and a missing binding gives the
start-up sentence naming the setting.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from contextlib import asynccontextmanager

import numpy as np
import pytest
from pipecat.frames.frames import InterruptionFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

from processors.errors import SetupError
from transports.aec import Aec3Canceller, EchoReference, make_canceller
from transports.pulse import PulseAudioParams, PulseAudioTransport
from transports.rig.audio import Recording, synth_speech
from transports.rig.line import timeline
from transports.rig.linemodel import LineModel
from transports.rig.pulse import PulseRig, pulseaudio_available

IN_RATE, OUT_RATE = 16000, 24000
STORY = ("Once upon a time, a little boat sailed out to sea on a bright summer morning. The sailor sang to "
         "the waves while the gulls circled above the mast. At noon a big grey whale came up beside the boat "
         "and sang back to him, low and slow. They sang together all afternoon, and the sun went down.")
LINE = LineModel("test", echo_delay_ms=200, echo_return_loss_db=6, band="narrowband", clip_dbfs=-12.0)

livekit_missing = pytest.mark.skipif(
    importlib.util.find_spec("livekit") is None, reason="livekit (the AEC3 binding) is not installed"
)
needs_pulse = pytest.mark.skipif(not pulseaudio_available(), reason="pulseaudio/pactl not installed")


# -- the reference timeline, with a fake clock --------------------------------------------------

class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_reference_lands_at_its_play_time_and_stays_contiguous():
    clock = Clock()
    ref = EchoReference(16000, clock)
    chunk = np.arange(1, 321, dtype=np.int16)  # 20 ms
    ref.written(chunk.tobytes(), 16000, clock.t)  # an idle stream: plays as it is written
    clock.t += 0.005  # the next write comes while the first still plays: queued behind it
    ref.written((chunk + 1000).tobytes(), 16000, clock.t)
    start = int(round(100.0 * 16000))
    got = ref.take(start, 640)
    assert np.array_equal(got[:320], chunk) and np.array_equal(got[320:], chunk + 1000)
    assert not ref.take(start - 160, 160).any()


def test_a_flush_cuts_what_was_never_played():
    clock = Clock()
    ref = EchoReference(16000, clock)
    ref.written(np.full(1600, 500, dtype=np.int16).tobytes(), 16000, clock.t)  # plays now .. +100 ms
    clock.t += 0.04
    ref.flushed()  # 40 ms played, 60 ms dropped
    now = int(round(clock.t * 16000))
    assert ref.take(now - 640, 640).all()  # played: still there for the mic's echo
    assert not ref.take(now, 960).any()  # dropped: never played, never in the reference
    # What is written next (a resume) starts where playback starts again, not after the dropped part.
    ref.written(np.full(320, 7, dtype=np.int16).tobytes(), 16000, clock.t)
    assert (ref.take(now, 320) == 7).all()
    clock.t += 0.3  # a resume after a pause: played from its write on, after a silent gap
    ref.written(np.full(320, 9, dtype=np.int16).tobytes(), 16000, clock.t)
    later = int(round(clock.t * 16000))
    assert not ref.take(now + 320, later - now - 320).any() and (ref.take(later, 320) == 9).all()


def test_a_reference_that_arrives_after_the_mic_passed_is_logged_once_not_raised():
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        clock = Clock()
        ref = EchoReference(16000, clock)
        ref.take(int(clock.t * 16000), 1600)  # the mic is 100 ms ahead of anything played
        for _ in range(3):
            ref.written(np.ones(320, dtype=np.int16).tobytes(), 16000, clock.t)
    finally:
        logger.remove(sink)
    assert ref.late_chunks == 3 and len([m for m in messages if "fell behind" in m]) == 1


@livekit_missing
def test_a_mic_that_dropped_audio_is_realigned_and_logged_once():
    """The capture stream lost 200 ms (a starved reader, a reattach): the canceller's timeline
    follows, with one warning, and every block still comes back."""
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    clock = Clock(0.0)
    canceller = Aec3Canceller(16000, clock=clock)
    try:
        for i in range(500):
            clock.t = (i + 1) * 0.02 + (0.2 if i > 150 else 0.0) + (0.2 if i > 350 else 0.0)
            assert len(canceller.process(np.zeros(320, dtype=np.int16).tobytes())) == 640
    finally:
        logger.remove(sink)
    assert canceller.reanchors == 2 and len([m for m in messages if "re-aligned" in m]) == 1
    clock.t += 0.02
    assert canceller._place(320) == int(0.4 * 16000) + 500 * 320  # sample 0 is now 400 ms later


# -- start-up ------------------------------------------------------------------------------------

def test_a_missing_binding_stops_start_up_with_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "livekit", None)  # import livekit -> ImportError
    with pytest.raises(SetupError) as err:
        make_canceller("aec3", 16000)
    message = str(err.value)
    assert "ECHO_CANCELLER" in message and "livekit" in message and message.count(". ") == 0
    assert make_canceller("pulse") is None and make_canceller("off") is None


def test_the_agent_stops_at_start_up_naming_echo_canceller(monkeypatch, make_settings):
    from agent.config import ConfigError, load_settings
    from agent.services import build_pulse_transport

    monkeypatch.setenv("ECHO_CANCELLER", "speex")
    with pytest.raises(ConfigError, match=r"^Setting ECHO_CANCELLER is invalid \(got 'speex'\): allowed values are "
                                          r"pulse, aec3, off\.$"):
        load_settings(stt_backend="whisper")
    monkeypatch.setitem(sys.modules, "livekit", None)
    with pytest.raises(SetupError, match="ECHO_CANCELLER=aec3 needs the livekit package"):
        build_pulse_transport(make_settings(echo_canceller="aec3"))


@livekit_missing
def test_a_rate_aec3_cannot_take_stops_start_up():
    with pytest.raises(SetupError, match="ECHO_CANCELLER=aec3 cannot run at 22050 Hz"):
        Aec3Canceller(22050)


@livekit_missing
def test_a_block_aec3_cannot_take_passes_the_mic_through():
    canceller = Aec3Canceller(16000)
    mic = (np.arange(480) % 50).astype(np.int16)  # 30 ms: whole 10 ms frames
    assert len(canceller.process(mic.tobytes())) == len(mic) * 2
    odd = np.ones(400, dtype=np.int16).tobytes()  # 25 ms
    assert canceller.process(odd) == odd  # logged, passed through, no exception out of the transport
    assert len(canceller.process(mic.tobytes())) == len(mic) * 2  # and the call goes on


# -- on the rig ----------------------------------------------------------------------------------

def level_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.asarray(x, dtype=np.float64) ** 2) + 1e-9)


def cancelled_between(canceller: Aec3Canceller, start: float, end: float) -> np.ndarray:
    pieces = [np.frombuffer(pcm, dtype=np.int16) for t, pcm in list(canceller.output) if start <= t < end]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)


def raw_between(rec: Recording, start: float, end: float) -> np.ndarray:
    first = int(round((start - rec.start_time()) * rec.sample_rate))
    last = int(round((end - rec.start_time()) * rec.sample_rate))
    return rec.samples[max(0, first) : max(0, last)]


def erle(canceller: Aec3Canceller, raw: Recording, start: float, end: float) -> float:
    return level_db(raw_between(raw, start, end)) - level_db(cancelled_between(canceller, start, end))


def reference_lag(fed: np.ndarray, played: Recording, t0: float, start: float, end: float) -> float:
    """How far (ms) the reference given to AEC3 lags the earpiece's audio, between two times."""
    a, b = int((start - t0) * IN_RATE), int((end - t0) * IN_RATE)
    ref = fed[a:b].astype(np.float64)
    offset = int(round((t0 - played.start_time()) * IN_RATE))
    ear = played.samples[a + offset - 2400 : b + offset + 2400].astype(np.float64)  # +-150 ms
    corr = np.correlate(ear, ref, mode="valid")  # corr[k]: ref ~ ear[k]; k = 2400 at no lag
    return (2400 - int(np.argmax(corr))) * 1000 / IN_RATE


@asynccontextmanager
async def call_on(rig: PulseRig):
    """The transport on the rig's raw line with AEC3; yields (worker, output, canceller)."""
    canceller = Aec3Canceller(IN_RATE, keep_output=True)
    transport = PulseAudioTransport(
        PulseAudioParams(server=rig.server, source=rig.RAW_MIC, sink=rig.SPEAKER, audio_in_enabled=True,
                         audio_out_enabled=True, audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE),
        echo_canceller=canceller,
    )
    worker = PipelineWorker(
        Pipeline([transport.input(), transport.output()]),
        params=PipelineParams(audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE),
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.sleep(0.5)
        yield worker, transport.output(), canceller
    finally:
        await worker.cancel(reason="test over")
        await asyncio.wait_for(task, 10)


def speech_frames(seconds: float):
    from tests.test_pulse_transport import tts_frames

    audio = synth_speech(STORY, OUT_RATE)[: int(seconds * OUT_RATE)]
    return tts_frames(audio, chunk_ms=40)


@pytest.fixture(scope="module")
def line_rig():
    with PulseRig(echo_cancel=False, line=LINE) as rig:
        yield rig


@needs_pulse
@livekit_missing
async def test_aec3_removes_20_db_of_a_200_ms_echo_after_convergence(line_rig):
    async with call_on(line_rig) as (worker, _output, canceller):
        with line_rig.record(line_rig.RAW_MIC) as raw:
            started = time.monotonic()
            await worker.queue_frames(speech_frames(10.0))
            await asyncio.sleep(10.5)
    # Half-second windows: one hiccup of the rig's own echo path (an underrun of its bridge on a
    # loaded machine moves the echo by ~10 ms, which no phone line does) must not hide the rest.
    windows = [erle(canceller, raw.recording, started + k / 2, started + (k + 1) / 2) for k in range(20)]
    print(f"AEC3 on a 200 ms narrowband echo, ERLE per 0.5 s: {np.round(windows, 1)} dB")
    assert level_db(raw_between(raw.recording, started + 4.0, started + 10.0)) > 10 * np.log10((32768 * 0.01) ** 2)
    assert np.median(windows[8:]) >= 20.0  # from 4 s on: converged


@needs_pulse
@livekit_missing
async def test_pause_resume_and_flush_keep_the_reference_in_step(line_rig):
    """After a pause and resume, and after an interruption's flush and a new reply, the echo is
    still cancelled from the first 100 ms on: no burst while the canceller would re-align."""
    async with call_on(line_rig) as (worker, output, canceller):
        with line_rig.record(line_rig.RAW_MIC) as raw, line_rig.record(line_rig.SPEAKER_MONITOR) as played:
            started = time.monotonic()
            await worker.queue_frames(speech_frames(12.0))
            await asyncio.sleep(5.0)  # converged
            for _ in range(2):
                await output.pause_playback()
                await asyncio.sleep(0.4)
                await output.resume_playback()
                await asyncio.sleep(1.0)
            resumed = time.monotonic() - 1.0
            await worker.queue_frames([InterruptionFrame()])
            await asyncio.sleep(0.6)
            await worker.queue_frames(speech_frames(3.0))
            replied = time.monotonic()
            await asyncio.sleep(3.3)
    rec = raw.recording
    before = erle(canceller, rec, started + 3.0, started + 5.0)
    echo_at = LINE.echo_delay_ms / 1000  # the echo of the resumed audio arrives this much later
    print(f"ERLE before the pauses {before:.1f} dB")
    assert before >= 20.0
    fed = timeline([(t, np.frombuffer(pcm, dtype=np.int16)) for t, pcm in canceller.fed], IN_RATE, started)
    lag_before = reference_lag(fed, played.recording, started, started + 3.0, started + 5.0)
    for when, what in ((resumed, "resume"), (replied, "flush and a new reply")):
        # The reference AEC3 got is still what the earpiece played, as far behind as before: within
        # one of AEC3's 10 ms frames (it tracks a delay that small itself). What this guards against
        # is a jump by the paused or dropped audio. Measured (4 runs, 2-core box): the lag moves
        # -3.3 to -5.1 ms at the resume (the sink's buffer refills after the flush), +0.1 to +2.0 ms
        # at the flush and new reply; the old bound of 5 ms failed one run in four under load.
        lag = reference_lag(fed, played.recording, started, when, when + 1.0)
        print(f"reference behind the earpiece: {lag_before:.1f} ms before, {lag:.1f} ms after the {what}")
        assert lag == pytest.approx(lag_before, abs=10.0), f"the reference moved at the {what}"
        blocks = [(when + echo_at + k * 0.1, when + echo_at + (k + 1) * 0.1) for k in range(10)]
        echo = np.array([level_db(raw_between(rec, a, b)) for a, b in blocks])
        gain = np.array([erle(canceller, rec, a, b) for a, b in blocks])
        print(f"after the {what}: raw echo {np.round(echo, 1)} dB, ERLE {np.round(gain, 1)} dB per 100 ms")
        # The blocks with real echo in them (a pause between words has little to remove). A burst
        # is echo let through nearly whole for as long as the canceller needs to find a moved
        # reference again. Measured with the flush's cut disabled (2-core box): 4 low blocks in a
        # row after the resume (0.4-7 dB), median 9.1 dB. AEC3 also dips by itself at a reply's
        # onset with the reference in place, on a loaded machine whose rig echo path jitters:
        # one block (9-15 dB, once 4.2 dB on a CI runner), and once two (8.3 and 4.8 dB, lag in
        # step, CI runner, 2026-12-07). So a burst is three low blocks in a row.
        loud = echo > echo.max() - 20
        low = (gain < 10.0) & loud
        assert not np.any(low[2:] & low[1:-1] & low[:-2]), f"an echo burst after the {what}"
        assert np.median(gain[loud]) >= 20.0, f"echo let through after the {what}"


# -- a line without echo ------------------------------------------------------------------------

def _story_and_caller() -> tuple[np.ndarray, np.ndarray]:
    far = synth_speech(STORY, IN_RATE).astype(np.float64)
    far *= 10 ** (-17 / 20) * 32768 / np.sqrt(np.mean(far[np.abs(far) > 30] ** 2))
    caller = synth_speech("Please tell me a long story about a sailor and the sea. Wait, stop please, what "
                          "time is it? Hold on, I need to ask you something else.", IN_RATE, voice="en-gb")
    n = min(len(far), len(caller), 14 * IN_RATE)
    return far[:n].astype(np.int16), (caller[:n] * 0.7).astype(np.int16)


def _run_offline(canceller: Aec3Canceller, clock: Clock, far: np.ndarray, mic: np.ndarray) -> np.ndarray:
    canceller.reference.written(far.tobytes(), IN_RATE, 0.0)
    out = []
    for i in range(0, len(mic) - 319, 320):
        clock.t = (i + 320) / IN_RATE
        out.append(np.frombuffer(canceller.process(mic[i : i + 320].tobytes()), dtype=np.int16))
    return np.concatenate(out)


@livekit_missing
def test_on_a_line_without_echo_the_caller_passes_once_that_is_clear():
    """Nothing comes back, the caller talks over Annie: AEC3 alone would take 9-31 dB off them;
    after three 2 s windows of Annie's speech without an echo the mic passes through whole."""
    far, caller = _story_and_caller()
    clock = Clock(0.0)
    canceller = Aec3Canceller(IN_RATE, clock=clock)
    out = _run_offline(canceller, clock, far, caller)
    assert canceller.presence.echo_free
    late = slice(8 * IN_RATE, len(out))  # past the three windows
    assert np.array_equal(out[late], caller[late])


@livekit_missing
def test_a_line_with_a_faint_echo_stays_cancelled():
    """A handset's echo (200 ms, 45 dB down, narrowband: about -62 dBFS) over a -75 dBFS noise
    floor: found, and cancelled down to the floor rather than passed through."""
    from transports.rig.linemodel import EchoPath

    far, _ = _story_and_caller()
    echo = EchoPath(LineModel("t", echo_delay_ms=200, echo_return_loss_db=45)).process(far / 32768.0) * 32768
    noise = np.random.default_rng(1).standard_normal(len(far)) * 10 ** (-75 / 20) * 32768
    mic = np.clip(echo + noise, -32768, 32767).astype(np.int16)
    clock = Clock(0.0)
    canceller = Aec3Canceller(IN_RATE, clock=clock)
    out = _run_offline(canceller, clock, far, mic)
    assert not canceller.presence.echo_free
    late = slice(6 * IN_RATE, len(out))
    print(f"faint echo {level_db(echo[late]):.1f}, floor {level_db(noise[late]):.1f}, out {level_db(out[late]):.1f} dB")
    assert level_db(out[late]) <= level_db(noise[late]) + 1.0  # the echo is gone, not passed through

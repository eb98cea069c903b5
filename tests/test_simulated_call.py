"""The README's first command: a whole simulated call, run as the operator runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the simulated caller speaks with espeak-ng"),
]


def simulate(tmp_path, barge_in: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENABLE_BARGE_IN": "1" if barge_in else "0"}
    return subprocess.run(
        [sys.executable, "-m", "agent.phone", "--simulate", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def wav_seconds_audible(path) -> float:
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)
    frames = pcm[: len(pcm) // (rate // 50) * (rate // 50)].reshape(-1, rate // 50)
    return float((np.sqrt((frames**2).mean(axis=1)) > 300).sum() / 50)


@pytest.mark.parametrize("barge_in", [True, False], ids=["barge-in", "half-duplex"])
def test_simulated_call(tmp_path, barge_in):
    result = simulate(tmp_path, barge_in)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    caller_lines = " ".join(line for line in out.splitlines() if "] caller:" in line).lower()
    assert "weather" in caller_lines and "story" in caller_lines, out
    assert "Annie: It is sunny" in out
    if barge_in:
        assert "--- barge-in" in out and "the interruption stopped Annie" in out
        assert "rowed home" not in out, "the story's end must not be played after the barge-in"
        assert "quarter past three" in out, "the interrupting question must be answered"
    else:
        assert "--- barge-in" not in out and "rowed home" in out
        assert "quarter past three" not in out, "half-duplex: speech during Annie's answer is ignored"
    assert "voice-to-voice" in out
    assert wav_seconds_audible(tmp_path / "annie.wav") > 3.0
    assert wav_seconds_audible(tmp_path / "caller.wav") > 3.0

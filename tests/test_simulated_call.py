"""The README's first command: a whole simulated call, run as the operator runs it.

``python -m agent.phone --simulate`` in a child process, with whatever this machine has (the
PulseAudio rig or the simulated line; llama.cpp + SmolLM2 or the scripted LLM; Piper or the
espeak-ng TTS). Besides the demo's own verdict (exit status 0), the test judges the call from
what a listener has: the printed transcript and the two WAV recordings.
"""

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
    pytest.mark.timeout(420),
]

BLOCK_S = 0.01
LOUD_RMS = 300.0


def simulate(tmp_path, barge_in: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENABLE_BARGE_IN": "1" if barge_in else "0"}
    return subprocess.run(
        [sys.executable, "-m", "agent.phone", "--simulate", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def loud_blocks(path) -> np.ndarray:
    """One bool per 10 ms of the recording: louder than about -40 dBFS."""
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)
    block = int(rate * BLOCK_S)
    n = len(pcm) // block
    return np.sqrt((pcm[: n * block].reshape(n, block) ** 2).mean(axis=1)) > LOUD_RMS


def utterances(loud: np.ndarray, max_gap_s: float = 0.8) -> list[tuple[float, float]]:
    """(start, end) seconds of the stretches of sound, pauses shorter than ``max_gap_s`` bridged."""
    spans: list[tuple[float, float]] = []
    for i in np.flatnonzero(loud):
        t = i * BLOCK_S
        if spans and t - spans[-1][1] <= max_gap_s:
            spans[-1] = (spans[-1][0], t + BLOCK_S)
        else:
            spans.append((t, t + BLOCK_S))
    return spans


def seconds_loud(loud: np.ndarray, start: float, end: float) -> float:
    return float(loud[int(start / BLOCK_S) : max(int(start / BLOCK_S), int(end / BLOCK_S))].sum() * BLOCK_S)


@pytest.mark.parametrize("barge_in", [True, False], ids=["barge-in", "half-duplex"])
def test_simulated_call(tmp_path, barge_in):
    result = simulate(tmp_path, barge_in)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]

    # The caller's two questions were heard: their words are in the live transcript.
    heard = " ".join(line for line in out.splitlines() if "] caller:" in line).lower()
    assert "weather" in heard and any(w in heard for w in ("story", "sailor", "sea")), out
    # Annie answered: she said something after each question, and it reached the caller.
    assert sum("] Annie:" in line for line in out.splitlines()) >= 2, out
    assert "voice-to-voice" in out
    assert "(TURN_END=adaptive)" in out, "the demo runs the agent's default turn end"

    caller = utterances(loud_blocks(tmp_path / "caller.wav"))
    annie = loud_blocks(tmp_path / "annie.wav")
    assert len(caller) == 3, f"the caller says three things: {caller}"
    (q1, _), (q2, _), (cut_in, cut_in_end) = caller
    assert seconds_loud(annie, q1, q2) > 1.0, "Annie answered the first question"
    assert seconds_loud(annie, q2, cut_in) > 1.0, "Annie was answering the second question"
    # While the caller is still talking over her, after a second to react, is Annie audible?
    overlap = seconds_loud(annie, cut_in + 1.0, cut_in_end)
    if barge_in:
        assert "--- barge-in" in out, out
        assert overlap == 0.0, f"the barge-in must silence Annie at the sink; she went on for {overlap:.2f} s"
        assert seconds_loud(annie, cut_in_end, len(annie) * BLOCK_S) > 0.5, "Annie answers the interruption"
    else:
        assert "--- barge-in" not in out, out
        assert overlap > 0.3, "half-duplex: Annie talks on while the caller talks over her"

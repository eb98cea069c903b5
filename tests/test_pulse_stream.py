"""The libpulse stream under the transport: a dying server fails a read or write, never hangs it.

``pa_simple`` deadlocked here (issue 24): a record stream that had returned part of a server
fragment kept the rest *peeked*, and with shared memory the mainloop thread, tearing down the dead
connection, waited for that block while holding the lock the next read or the free needed. The
capture thread hung for ever and the agent was deaf for the rest of the call. Each round below
leaves a fragment half read, kills the daemon and then reads (or writes) and closes; with
``pa_simple`` the first round already hung.
"""

from __future__ import annotations

import threading

import pytest

from transports._pulse_stream import PulseStream, PulseStreamError
from transports.rig.pulse import PulseRig, pulseaudio_available

pytestmark = pytest.mark.skipif(
    not pulseaudio_available(), reason="pulseaudio/pactl not installed (apt-get install pulseaudio pulseaudio-utils)"
)

ROUNDS = 8
BLOCK = 640  # 20 ms at 16 kHz mono


@pytest.fixture(scope="module")
def rig():
    with PulseRig(echo_path=False) as r:
        yield r


def open_stream(rig: PulseRig, direction: str) -> PulseStream:
    return PulseStream(
        direction, sample_rate=16000, channels=1, server=rig.server,
        device=rig.SOURCE if direction == "record" else rig.SINK, app_name="annie-test",
        stream_name=f"test-{direction}", fragsize=BLOCK, maxlength=BLOCK * 25, tlength=BLOCK * 3,
        prebuf=BLOCK, minreq=BLOCK // 2,
    )


def use_until_it_fails(stream: PulseStream, direction: str, timeout: float) -> str | None:
    """Read or write on another thread until the stream fails, then close it; the error, or None
    if that thread was still blocked after ``timeout`` seconds (the deadlock)."""
    outcome: list[str] = []

    def run() -> None:
        try:
            for _ in range(200):
                if direction == "record":
                    stream.read(BLOCK - 140, timeout=0.5)
                else:
                    stream.write(bytes(BLOCK))
            outcome.append("the stream kept working with the server gone")
        except PulseStreamError as e:
            outcome.append(str(e))
        finally:
            stream.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if thread.is_alive() else outcome[0]


@pytest.mark.parametrize("direction", ["record", "playback"])
def test_a_server_that_dies_mid_stream_fails_it_without_hanging(rig, direction):
    for round_ in range(ROUNDS):
        stream = open_stream(rig, direction)
        for _ in range(3):
            if direction == "record":
                # 500 bytes of each 640-byte fragment: part of one is left over, as pa_simple kept it.
                assert stream.read(BLOCK - 140, timeout=2.0) is not None, "no audio from a live source"
            else:
                stream.write(bytes(BLOCK))
        rig.kill_daemon()
        try:
            error = use_until_it_fails(stream, direction, timeout=10.0)
        finally:
            rig.start_daemon()
        assert error is not None, f"round {round_}: the {direction} stream hung after the server died"
        assert "kept working" not in error, error


def test_reads_time_out_instead_of_blocking(rig):
    """A read that cannot be filled in time returns None, and keeps what it had for the next one."""
    with open_stream(rig, "record") as stream:
        assert stream.read(BLOCK, timeout=2.0) is not None
        # Far more than the source can deliver in 50 ms: the read gives up rather than waiting.
        assert stream.read(16000 * 2 * 5, timeout=0.05) is None
        # Nothing was lost by giving up: the audio read so far is still there for the next read.
        assert stream.read(BLOCK, timeout=2.0) is not None


def test_no_server_is_an_error_not_a_hang(tmp_path):
    with pytest.raises(PulseStreamError):
        PulseStream("record", sample_rate=16000, channels=1, server=f"unix:{tmp_path}/none",
                    device=None, app_name="annie-test", stream_name="test")


def test_a_reader_a_whole_buffer_behind_is_told_the_server_drops_audio(rig, log_lines):
    """The server drops the oldest recording once the reader is ``maxlength`` behind, silently;
    the stream says so (a count and a WARNING line). Reading in time says nothing."""
    import time

    stream = PulseStream(
        "record", sample_rate=16000, channels=1, server=rig.server, device=rig.SOURCE, app_name="annie-test",
        stream_name="test-behind", fragsize=BLOCK, maxlength=BLOCK * 5,
    )
    try:
        for _ in range(25):  # half a second read in time
            assert stream.read(BLOCK, timeout=1.0) is not None
        in_time = stream.overruns
        time.sleep(0.5)  # 500 ms behind a 100 ms buffer
        assert stream.read(BLOCK, timeout=1.0) is not None
    finally:
        stream.close()
    assert in_time == 0
    assert stream.overruns >= 1
    assert any("a whole buffer" in line and "drops the oldest" in line for line in log_lines), log_lines

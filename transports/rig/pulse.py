"""A private, headless PulseAudio with echo cancellation, for tests, benchmarks and demos.

The rig is the phone call in a box (DESIGN.md section 5)::

    bot audio -> echo_cancel_sink -> [webrtc AEC] -> speaker (null sink)
                                                        |  speaker.monitor
                                   loopback (30 ms): the echo path
                                                        v
    caller speech (play/say) ----------------------> micsrc (null sink)
                                                        |  micsrc.monitor = the raw mic
    agent listens on echo_cancel_source <- [webrtc AEC] <-

Usage::

    with PulseRig() as rig:
        transport = PulseAudioTransport(PulseAudioParams(server=rig.server, ...))
        with rig.record(rig.SOURCE) as rec:
            rig.say("Hello Annie").wait()
        print(rec.recording.rms_dbfs())

Each rig runs its own daemon in its own runtime directory (``XDG_RUNTIME_DIR``,
``PULSE_RUNTIME_PATH``, ``HOME`` all private), reachable only at :attr:`PulseRig.server`; it never
touches a user's session. The daemon is stopped by its pid on exit. If the owning process is
killed instead, a small watchdog (``sh``, polling every half second) stops the daemon, and the
next rig started on the machine removes whatever is left over. (Not ``PR_SET_PDEATHSIG``: that
fires when the *thread* that started the daemon exits, e.g. an executor thread.) Works as root
(CI) and as a normal user, from any thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from transports.rig.audio import Playback, Recorder, path_delay, synth_speech
from transports.rig.echo_bridge import EchoBridge
from transports.rig.linemodel import LineModel

RIG_ROOT = Path(tempfile.gettempdir()) / "annie-pulse-rig"
START_TIMEOUT_S = 10.0

# Measured on this rig (2 busy cores, espeak speech, 8 utterances each): webrtc's defaults give
# 12-59 dB of echo return loss enhancement, worst at the start of each utterance, and their analog
# gain control turns the mic down by 28 dB and keeps moving it; with these args, 33-55 dB and a
# steady mic level, and the caller's words survive double talk better. Recommended on the box too.
# bench/bargein_aec_probe.py (Piper's voice as Annie at 0 dB echo gain, espeak callers, 6 trials
# each) found nothing better among the module's arguments: webrtc's defaults lose the caller by
# 20-30 dB to the gain control; noise_suppression=0 lets the suppressor take 14.5 dB of the caller's
# first 300 ms in double talk (7.7-8.1 dB with it on); extended_filter=0 keeps 20 dB less echo out
# (residual -39 dBFS against -47..-59); mobile=1 (AECM) cancels nothing here.
DEFAULT_AEC_ARGS = "analog_gain_control=0 extended_filter=1"
STOP_TIMEOUT_S = 3.0
CALIBRATION_MEASUREMENTS = 3  # the line echo path's delay: the median of this many measurements


class RigError(RuntimeError):
    """The rig could not be set up; the message ends with the tail of the daemon's log."""


def pulseaudio_available() -> bool:
    """Whether the ``pulseaudio`` and ``pactl`` binaries are installed (tests skip otherwise)."""
    return bool(shutil.which("pulseaudio") and shutil.which("pactl"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_rigs() -> None:
    """Stop daemons left by rigs whose owner process died (killed test runs)."""
    if not RIG_ROOT.is_dir():
        return
    for rig_dir in RIG_ROOT.iterdir():
        try:
            owner = int((rig_dir / "owner").read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError):
            pid = int((rig_dir / "daemon.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            # Only a pulseaudio started for this very directory is ours to kill.
            if b"pulseaudio" in cmdline and str(rig_dir).encode() in Path(
                f"/proc/{pid}/environ"
            ).read_bytes():
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(rig_dir, ignore_errors=True)


class PulseRig:
    """A private PulseAudio daemon wired as a phone call with an echo path and webrtc AEC.

    Attributes:
        SPEAKER: Null sink standing for the phone's earpiece (what the caller hears).
        MIC: Null sink standing for the phone's microphone; play caller speech into it.
        RAW_MIC: The raw mic as a source (caller speech plus echo), before echo cancellation.
        SPEAKER_MONITOR: What reaches the speaker, as a source.
        SOURCE: The echo-cancelled mic: what the agent listens to.
        SINK: Where the agent plays; it feeds the AEC's reference and then the speaker.
    """

    SPEAKER = "speaker"
    MIC = "micsrc"
    RAW_MIC = "micsrc.monitor"
    SPEAKER_MONITOR = "speaker.monitor"
    SOURCE = "echo_cancel_source"
    SINK = "echo_cancel_sink"
    # Default sink/source nobody uses: streams whose device vanishes land here (silence), and
    # a device coming back never changes the default, so PulseAudio moves nothing behind our back.
    IDLE = "idle"

    def __init__(
        self,
        *,
        echo_cancel: bool = True,
        echo_path: bool = True,
        echo_latency_ms: int = 30,
        aec_args: str = DEFAULT_AEC_ARGS,
        line: LineModel | None = None,
    ) -> None:
        """Describe the rig; :meth:`start` (or ``with``) brings it up.

        Args:
            echo_cancel: Load ``module-echo-cancel`` (webrtc), giving :attr:`SOURCE`/:attr:`SINK`.
            echo_path: Loop the speaker back into the mic (``module-loopback``), as a phone would.
            echo_latency_ms: Delay of that echo path.
            aec_args: ``aec_args`` for the webrtc canceller (see :data:`DEFAULT_AEC_ARGS`); ``""``
                gives webrtc's own defaults.
            line: A phone line model (:mod:`transports.rig.linemodel`): the echo path becomes an
                :class:`~transports.rig.echo_bridge.EchoBridge` with the line's delay, band, loss and
                distortion, plus the caller's room; ``echo_path``/``echo_latency_ms`` are then unused.
        """
        self._echo_cancel = echo_cancel
        self._echo_path = echo_path
        self._echo_latency_ms = echo_latency_ms
        self._aec_args = aec_args
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None
        self._echo_cancel_module: int | None = None
        self._line = line
        self._bridge: EchoBridge | None = None

    # Lifecycle

    def __enter__(self) -> PulseRig:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the daemon and load the modules.

        Raises:
            RigError: pulseaudio is missing or did not come up.
        """
        if not pulseaudio_available():
            raise RigError("pulseaudio/pactl are not installed (apt-get install pulseaudio pulseaudio-utils)")
        _sweep_stale_rigs()
        RIG_ROOT.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=RIG_ROOT))
        (self._dir / "owner").write_text(str(os.getpid()))
        for sub in ("runtime", "home", "state"):
            (self._dir / sub).mkdir(mode=0o700)
        try:
            self._start_daemon()
            self._load_modules()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the daemon by its pid and remove the rig's directory; safe to call twice."""
        self._stop_daemon()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart_daemon(self, down_s: float = 0.0) -> None:
        """Simulate a PulseAudio restart: kill the daemon, wait ``down_s``, start a fresh one."""
        self.kill_daemon()
        time.sleep(down_s)
        self.start_daemon()

    def kill_daemon(self) -> None:
        """Stop the daemon (SIGTERM, SIGKILL after 3 s); every client loses its connection."""
        self._stop_daemon()

    def start_daemon(self) -> None:
        """Start a fresh daemon with the rig's devices, after :meth:`kill_daemon`."""
        self._start_daemon()
        self._load_modules()

    # Addresses

    @property
    def dir(self) -> Path:
        """The rig's private directory (runtime dir, HOME, daemon log)."""
        if self._dir is None:
            raise RigError("the rig is not started")
        return self._dir

    @property
    def server(self) -> str:
        """Server string for libpulse clients (``PulseAudioParams.server``, ``PULSE_SERVER``)."""
        return f"unix:{self.dir / 'runtime' / 'native'}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses (paplay, parec, the agent) that should use this rig."""
        env = dict(os.environ)
        env.update(
            PULSE_SERVER=self.server,
            XDG_RUNTIME_DIR=str(self.dir / "runtime"),
            PULSE_RUNTIME_PATH=str(self.dir / "runtime"),
            PULSE_STATE_PATH=str(self.dir / "state"),
            HOME=str(self.dir / "home"),
        )
        return env

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        if self._proc is None:
            raise RigError("the daemon is not running")
        return self._proc.pid

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the daemon's log, for error messages."""
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / "daemon.log").read_text().splitlines()[-lines:])
        return ""

    # Control

    def pactl(self, *args: str) -> str:
        """Run ``pactl`` against this rig and return its stdout.

        Raises:
            RigError: pactl failed.
        """
        result = subprocess.run(
            ["pactl", *args], env=self.env, capture_output=True, text=True, timeout=10
        )
        if result.returncode != 0:
            raise RigError(f"pactl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def load_echo_cancel(self) -> None:
        """(Re)load the echo canceller: :attr:`SOURCE` and :attr:`SINK` appear."""
        args = [
            "module-echo-cancel",
            f"source_master={self.RAW_MIC}",
            f"sink_master={self.SPEAKER}",
            "aec_method=webrtc",
            f"source_name={self.SOURCE}",
            f"sink_name={self.SINK}",
        ]
        if self._aec_args:
            args.append(f'aec_args="{self._aec_args}"')
        self._echo_cancel_module = int(self.pactl("load-module", *args))
        self._warm_up(self.SOURCE)

    def unload_echo_cancel(self) -> None:
        """Unload the echo canceller: :attr:`SOURCE` and :attr:`SINK` vanish, as when the phone's
        Bluetooth link drops and takes the canceller's master with it."""
        if self._echo_cancel_module is not None:
            self.pactl("unload-module", str(self._echo_cancel_module))
            self._echo_cancel_module = None

    @contextlib.contextmanager
    def source_outage(self) -> Iterator[None]:
        """The agent's source and sink are gone inside the block and back after it."""
        self.unload_echo_cancel()
        try:
            yield
        finally:
            self.load_echo_cancel()

    def set_echo_gain_db(self, gain_db: float) -> None:
        """Set the echo path's gain (0 dB: the caller's mic hears Annie as loud as she plays).

        Measured on this rig with espeak voices at equal levels: at 0 dB, double talk costs the
        caller most of their words even after cancellation; at -6 dB (a loud speakerphone) the
        canceller keeps them while the raw mic loses some; at -12 dB both keep them.
        """
        out = self.pactl("list", "short", "sink-inputs")
        loopbacks = [line.split("\t")[0] for line in out.splitlines() if "module-loopback" in line]
        if not loopbacks:
            raise RigError("the rig has no echo path (echo_path=False)")
        self.pactl("set-sink-input-volume", loopbacks[0], f"{10 ** (gain_db / 20):.4f}")

    def devices(self, kind: str = "sources") -> list[str]:
        """Names of the rig's ``sources`` or ``sinks``."""
        out = self.pactl("list", "short", kind)
        return [line.split("\t")[1] for line in out.splitlines() if line]

    # Audio

    def play(self, audio: np.ndarray, sample_rate: int, device: str = MIC) -> Playback:
        """Play int16 mono audio into a sink (default: the caller's mic) on a thread."""
        return Playback(self.server, device, audio, sample_rate)

    def say(self, text: str, device: str = MIC, sample_rate: int = 16000) -> Playback:
        """Speak ``text`` with espeak-ng into a sink (default: the caller's mic)."""
        return self.play(synth_speech(text, sample_rate), sample_rate, device)

    def record(self, source: str, sample_rate: int = 16000, block_ms: int = 10) -> Recorder:
        """Start recording a source (e.g. :attr:`SPEAKER_MONITOR`, :attr:`RAW_MIC`, :attr:`SOURCE`).

        Use as a context manager or call ``stop()``; the result is ``recorder.recording``.
        """
        return Recorder(self.server, source, sample_rate, block_ms)

    # Internals

    def _start_daemon(self) -> None:
        assert self._dir is not None
        cmd = [
            "pulseaudio",
            "--daemonize=no",
            "--system=no",
            "-n",  # no default.pa: only the modules we load
            "--exit-idle-time=-1",
            "--disallow-exit",
            "--realtime=no",
            "--high-priority=no",
            "--no-cpu-limit",
            "--log-target=stderr",
            "--load=module-native-protocol-unix auth-anonymous=1",
        ]
        env = self.env
        env.pop("PULSE_SERVER")
        log = open(self._dir / "daemon.log", "ab")  # noqa: SIM115 - kept open for the daemon
        self._log_file = log
        self._proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C in the test's terminal is not for the daemon
        )
        (self._dir / "daemon.pid").write_text(str(self._proc.pid))
        self._watchdog = self._start_watchdog(self._proc.pid)
        self._wait_ready()

    @staticmethod
    def _start_watchdog(daemon_pid: int) -> subprocess.Popen[bytes]:
        """A shell loop that stops the daemon if this process dies without cleaning up."""
        owner = os.getpid()
        # A killed owner may linger as a zombie until its parent reaps it: that counts as dead.
        owner_alive = f"[ -n \"$(grep '^State:' /proc/{owner}/status 2>/dev/null | grep -v Z)\" ]"
        script = (
            f"while {owner_alive} && kill -0 {daemon_pid} 2>/dev/null; "
            f"do sleep 0.5; done; kill -TERM {daemon_pid} 2>/dev/null"
        )
        return subprocess.Popen(
            ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RigError(f"pulseaudio exited with {self._proc.returncode}:\n{self.log_tail()}")
            if (self.dir / "runtime" / "native").exists():
                with contextlib.suppress(RigError, subprocess.TimeoutExpired):
                    self.pactl("info")
                    return
            time.sleep(0.05)
        raise RigError(f"pulseaudio did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def _stop_daemon(self) -> None:
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            bridge.stop()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        log, self._log_file = self._log_file, None
        if log is not None:
            log.close()  # type: ignore[attr-defined]
        self._echo_cancel_module = None

    def _warm_up(self, *sources: str) -> None:
        """Wait until each source delivers audio.

        A null sink nobody listened to renders in blocks of up to 2 s, so the first recording of
        its monitor starts that late; one short recording right after loading fixes it for good.
        """
        recorders = [Recorder(self.server, source) for source in sources]
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while any(not r.snapshot().block_end_times.size for r in recorders):
                if time.monotonic() > deadline:
                    raise RigError(f"no audio from {', '.join(sources)}:\n{self.log_tail()}")
                time.sleep(0.02)
        finally:
            for r in recorders:
                r.stop()

    def _load_modules(self) -> None:
        for name in (self.IDLE, self.SPEAKER, self.MIC):
            self.pactl("load-module", "module-null-sink", f"sink_name={name}")
        self.pactl("set-default-sink", self.IDLE)
        self.pactl("set-default-source", f"{self.IDLE}.monitor")
        if self._echo_cancel:
            self.load_echo_cancel()
        if self._line is not None:
            self._start_line(self._line)
        elif self._echo_path:
            self.pactl(
                "load-module",
                "module-loopback",
                f"source={self.SPEAKER_MONITOR}",
                f"sink={self.MIC}",
                f"latency_msec={self._echo_latency_ms}",
                "source_dont_move=true",
                "sink_dont_move=true",
                "adjust_time=0",
            )
        self._warm_up(self.SPEAKER_MONITOR, self.RAW_MIC)

    def measure_echo_path(self, seconds: float = 0.5, level_dbfs: float = -20.0) -> tuple[float, float]:
        """Play a noise burst into :attr:`SPEAKER`; the delay (ms) and gain (dB) to :attr:`RAW_MIC`.

        Measures the rig's echo path as it is (``module-loopback`` or the line's bridge), with
        nothing else playing.
        """
        rng = np.random.default_rng(5)
        noise = (rng.standard_normal(int(seconds * 16000)) * 32768 * 10 ** (level_dbfs / 20)).astype(np.int16)
        wait = (self._line.echo_delay_ms if self._line else self._echo_latency_ms) / 1000 + 0.3
        with self.record(self.SPEAKER_MONITOR) as earpiece, self.record(self.RAW_MIC) as mic:
            time.sleep(0.1)
            self.play(noise, 16000, device=self.SPEAKER).wait(10)
            time.sleep(wait)
        return path_delay(earpiece.recording, mic.recording)

    def _start_line(self, line: LineModel) -> None:
        room = line.room_audio(60.0, np.random.default_rng(19)) if line.room != "quiet" else None
        self._bridge = EchoBridge(self.server, self.SPEAKER_MONITOR, self.MIC, line, room=room)
        try:
            self._bridge.start()
            self._bridge.settle()
            if line.has_echo:
                self._warm_up(self.SPEAKER_MONITOR, self.RAW_MIC)
                self._bridge.room_on = False  # the burst alone on the line while measuring
                # One measurement varies by ~15 ms either way (each recording's start is estimated
                # from when its blocks were read: 233-260 ms for a 250 ms line over 18 measurements);
                # the median of three is steadier. The path itself can still move later, when other
                # streams connect to the earpiece's monitor (238-290 ms after the echo gate's run).
                delay_ms = float(np.median([self.measure_echo_path()[0] for _ in range(CALIBRATION_MEASUREMENTS)]))
                self._bridge.calibrate(delay_ms)
                self._bridge.wait_calibrated()
                self._bridge.room_on = True
        except RuntimeError as e:
            raise RigError(f"{e}:\n{self.log_tail()}") from e

    @property
    def line(self) -> LineModel | None:
        """The phone line model the echo path follows, if any."""
        return self._line


__all__ = [
    "PulseRig",
    "RigError",
    "Playback",
    "Recorder",
    "pulseaudio_available",
    "synth_speech",
]

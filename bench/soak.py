"""Soak: one long simulated call with many barge-ins; does anything grow, does every turn get an answer?

The assembled call pipeline (barge-in on, pause-then-decide) runs on the simulated phone line,
with the Gemma service and the Chatterbox service talking HTTP to the stand-in servers, each in
its own child process (so their memory is not counted here). A scripted caller speaks a turn
(injected VAD and transcription frames, as in the tests), waits until Annie starts to answer,
lets her speak a random 0.2-0.8 s, then cuts in with the next turn; every tenth answer is heard
to the end. Everything runs in real time; the ``--dense`` default simply leaves little idle time
between the events, so a run has many more barge-ins per minute than a real call would.

Every ``--sample-s`` it records this process's RSS, open file descriptors, asyncio tasks and
threads, and the size of the LLM context. At the end it prints start/end figures, checks them
against the bounds below (after a warm-up of ``--warmup-turns`` turns), and writes
``bench/results/soak_<label>.json`` and a PNG. A turn that gets no answer within 10 s is logged with
the stages it reached (turn started, interruption, turn ended, LLM answering, TTS started) and
the pause-then-decide decisions taken during it.

``--tracemalloc`` also traces Python allocations: a snapshot after the warm-up and one at the
end; the JSON and the printout get the top growth by file:line and live objects by type, and
each sample the traced heap, so Python heap growth can be told apart from RSS growth
(allocator arenas, native memory). Tracing slows the run and adds its own tables to RSS.

    python bench/soak.py --minutes 14 --label 14min
    python bench/soak.py --minutes 10 --label tracemalloc10min --tracemalloc
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loguru import logger  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.filters.identity_filter import IdentityFilter  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from agent.config import AgentSettings  # noqa: E402
from agent.demo.caller import ScriptedCaller, poll_until  # noqa: E402
from agent.demo.frames import FrameTimes  # noqa: E402
from agent.pipeline import build_call_pipeline  # noqa: E402
from agent.services import build_llm, build_tts  # noqa: E402
from agent.demo.standins.tts_server import TTSStandInProcess  # noqa: E402
from transports.rig.line import SimLine  # noqa: E402

# Growth allowed between the end of the warm-up and the end of the run.
BOUNDS = {"rss_mb": 40.0, "fds": 4, "tasks": 4, "threads": 2}
QUESTIONS = [
    "what is the weather like", "tell me a story", "what time is it", "when is the doctor coming",
    "read me the news", "what did my daughter say", "is it going to rain", "what day is it today",
]


@dataclass
class Sample:
    t: float
    turns: int
    barge_ins: int
    rss_mb: float
    fds: int
    tasks: int
    threads: int
    context_messages: int
    context_chars: int
    py_heap_mb: float | None = None  # what tracemalloc sees (``--tracemalloc`` only)


# The stages of a turn, in order: the frame kind that marks each (agent.demo.frames.WATCHED) and its
# name in the report of a turn that got no answer.
STAGES = {"turn_started": "turn started", "interruption": "interruption", "turn_ended": "turn ended",
          "llm_start": "LLM answering", "tts_started": "TTS started", "bot_started": "Annie speaking"}


def stages_since(times: FrameTimes, t: float) -> list[str]:
    return [name for kind, name in STAGES.items() if (times.last(kind) or 0.0) >= t]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class HeapProbe:
    """What grows on the Python heap: tracemalloc snapshots and live objects by type.

    ``mark()`` after the warm-up, ``report()`` at the end. The Python heap (tracemalloc) is
    only part of RSS: memory the allocator keeps in its arenas after a free, and native
    allocations (numpy buffers are traced, C libraries' own mallocs are not) show up in RSS alone.
    """

    def __init__(self, frames: int):
        tracemalloc.start(frames)
        self._snapshot: tracemalloc.Snapshot | None = None
        self._types: Counter[str] = Counter()

    @staticmethod
    def heap_mb() -> float:
        return round(tracemalloc.get_traced_memory()[0] / 2**20, 2)

    @staticmethod
    def _type_counts() -> Counter[str]:
        return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())

    @staticmethod
    def _filtered(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
        return snapshot.filter_traces([
            tracemalloc.Filter(False, tracemalloc.__file__),
        ])

    def mark(self) -> None:
        gc.collect()
        self._snapshot = self._filtered(tracemalloc.take_snapshot())
        self._types = self._type_counts()

    def report(self, top: int = 15) -> dict:
        gc.collect()
        end = self._filtered(tracemalloc.take_snapshot())
        assert self._snapshot is not None, "mark() first"
        by_line = [
            {"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}", "growth_kb": round(s.size_diff / 1024, 1),
             "size_kb": round(s.size / 1024, 1), "count_growth": s.count_diff}
            for s in end.compare_to(self._snapshot, "lineno")[:top]
        ]
        by_trace = [
            {"growth_kb": round(s.size_diff / 1024, 1), "count_growth": s.count_diff,
             "traceback": [f"{f.filename}:{f.lineno}" for f in s.traceback]}
            for s in end.compare_to(self._snapshot, "traceback")[:5]
        ]
        types = self._type_counts()
        type_growth = sorted(((n - self._types.get(t, 0), t) for t, n in types.items()), reverse=True)[:top]
        return {
            "traced_mb_after_warmup": round(sum(s.size for s in self._snapshot.statistics("filename")) / 2**20, 2),
            "traced_mb_end": round(sum(s.size for s in end.statistics("filename")) / 2**20, 2),
            "top_growth_by_line": by_line,
            "top_growth_by_traceback": by_trace,
            "object_growth_by_type": [{"type": t, "growth": n} for n, t in type_growth if n > 0],
        }


class LLMChild:
    """The LLM stand-in in a child process (``--port 0``; it prints its URL)."""

    def __init__(self, token_delay_s: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.demo.standins.llm_server", "--port", "0", "--token-delay", str(token_delay_s)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"http://\S+", line)
        if not match:
            self.close()
            raise RuntimeError(f"the LLM stand-in did not start: {line!r}")
        self.url = match.group(0)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Caller(ScriptedCaller):
    """Speaks in the frames the VAD and the STT would make (hours of turns at speed, no audio to
    transcribe); listens at the line's ear like every scripted caller."""

    def __init__(self, worker, times: FrameTimes, line: SimLine):
        super().__init__(line)
        self.worker = worker
        self.times = times

    async def say(self, text: str, speech_s: float) -> float:
        await self.worker.queue_frames([VADUserStartedSpeakingFrame(start_secs=0.2)])
        await self.worker.queue_frames([InterimTranscriptionFrame(text=text.split()[0], user_id="caller", timestamp="")])
        await asyncio.sleep(speech_s)
        said = time.monotonic()
        # As on a real line: the VAD stops after its stop_secs of silence, and the STT's final
        # follows the VAD stop (it finalizes on it).
        await asyncio.sleep(0.2)
        await self.worker.queue_frames(
            [VADUserStoppedSpeakingFrame(stop_secs=0.2),
             TranscriptionFrame(text=text, user_id="caller", timestamp="", finalized=True)]
        )
        return said

    def _heard_answer(self, onset: float, after: float) -> bool:
        """Sound at the ear from an LLM answer begun since the turn's onset.

        Judged by what the caller hears, not by ``BotStartedSpeakingFrame``: pipecat's output can
        announce "started speaking" for a chunk taken off its queue just before an interruption,
        and then stays "speaking" into the next answer without announcing it (bench/FAULTS.md).
        """
        llm_at = self.times.last("llm_start")
        return llm_at is not None and llm_at >= onset and self.audible_after(max(after, llm_at), margin_s=0.0)

    async def answer_started(self, onset: float, after: float, timeout: float) -> bool:
        return await poll_until(lambda: self._heard_answer(onset, after), timeout, poll_s=0.01)

    def announced(self, after: float) -> bool:
        return (self.times.last("bot_started") or 0.0) > after

    async def quiet(self, timeout: float) -> bool:
        return await poll_until(lambda: not self.times.bot_speaking, timeout)


async def soak(args) -> dict:
    settings = AgentSettings(
        stt_backend="whisper", enable_barge_in=True, user_speech_timeout_ms=args.speech_timeout_ms,
        llm_timeout_s=5.0,
    )
    llm_child = LLMChild(token_delay_s=0.02)
    tts_server = TTSStandInProcess(realtime_factor=5.0).__enter__()
    try:
        # The simulated line records what it plays, and the frame times what went by: keep a
        # minute of the one and the latest of the other, not an hour.
        line = SimLine(settings.audio_out_sample_rate, max_recording_s=60.0)
        times = FrameTimes(keep_last=50)
        call = build_call_pipeline(
            settings, transport=line.transport, stt=IdentityFilter(), llm=build_llm(settings, base_url=llm_child.url),
            tts=build_tts(settings, base_url=tts_server.url), vad_analyzer=None, observers=[times],
            stt_streams_partials=True,
        )
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(call.worker)
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.5)
        caller = Caller(call.worker, times, line)
        rng = random.Random(args.seed)
        samples: list[Sample] = []
        turns = barge_ins = unanswered = 0
        unanswered_turns: list[int] = []
        unanswered_detail: list[dict] = []
        unannounced_turns: list[int] = []  # heard, but no BotStartedSpeakingFrame after the question
        started = time.monotonic()
        next_sample = started
        baseline: Sample | None = None
        heap = HeapProbe(args.tracemalloc_frames) if args.tracemalloc else None

        def sample() -> Sample:
            gc.collect()
            messages = call.context.get_messages()
            return Sample(
                t=round(time.monotonic() - started, 1), turns=turns, barge_ins=barge_ins, rss_mb=round(rss_mb(), 1),
                fds=open_fds(), tasks=len(asyncio.all_tasks()), threads=threading.active_count(),
                context_messages=len(messages), context_chars=sum(len(str(m.get("content", ""))) for m in messages),
                py_heap_mb=heap.heap_mb() if heap else None,
            )

        try:
            while time.monotonic() - started < args.minutes * 60 and (not args.max_turns or turns < args.max_turns):
                if task.done():
                    raise RuntimeError(f"the call pipeline ended by itself after {turns} turns: {task!r}")
                cut_in = times.bot_speaking  # Annie is speaking: this turn is a barge-in
                # A number no earlier reply contained: pause-then-decide ignores, as echo, an
                # interruption made only of words Annie said lately (see bench/FAULTS.md).
                question = f"{rng.choice(QUESTIONS)} number {turns + 1}" if args.unique_words else rng.choice(QUESTIONS)
                onset = time.monotonic()
                decided = len(call.pause_first.decisions) if call.pause_first else 0
                said = await caller.say(question, speech_s=rng.uniform(0.15, 0.35))
                turns += 1
                barge_ins += cut_in
                answered = await caller.answer_started(onset, said, timeout=10.0)
                if answered and not caller.announced(said):
                    unannounced_turns.append(turns)
                if not answered:
                    unanswered += 1
                    unanswered_turns.append(turns)
                    detail = {
                        "turn": turns, "barge_in": cut_in, "t": round(onset - started, 1),
                        "stages_reached": stages_since(times, onset),
                        "pause_first_decisions": [
                            (d, round(s, 2)) for d, s in (call.pause_first.decisions[decided:] if call.pause_first else [])
                        ],
                    }
                    unanswered_detail.append(detail)
                    logger.error(f"turn {turns} ({'a barge-in' if cut_in else 'Annie quiet'}) got no answer within 10 s: "
                                 f"reached {detail['stages_reached']}, decisions {detail['pause_first_decisions']}")
                    await caller.quiet(20)
                elif turns % 10 == 0:
                    await caller.quiet(30)  # hear this one to the end
                    await asyncio.sleep(rng.uniform(0.3, 0.8))
                else:
                    await asyncio.sleep(rng.uniform(0.2, 0.8))  # Annie speaks a little, then the caller cuts in
                if turns == args.warmup_turns:
                    baseline = sample()
                    samples.append(baseline)
                    if heap:
                        heap.mark()
                if time.monotonic() >= next_sample:
                    samples.append(sample())
                    next_sample += args.sample_s
                    s = samples[-1]
                    heap_note = f" py-heap {s.py_heap_mb} MB" if heap else ""
                    print(f"[{s.t:7.1f}s] turns {s.turns} barge-ins {s.barge_ins} RSS {s.rss_mb} MB{heap_note} fds {s.fds} "
                          f"tasks {s.tasks} threads {s.threads} context {s.context_messages} msgs", flush=True)
            await caller.quiet(30)
            await asyncio.sleep(1.0)
            end = sample()
            samples.append(end)
            heap_report = heap.report() if heap and baseline else None
        finally:
            await call.worker.cancel(reason="soak over")
            await asyncio.wait_for(task, 30)
    finally:
        tts_server.__exit__()
        llm_child.close()

    first = samples[0]
    base = baseline or first
    growth = {k: getattr(end, k) - getattr(base, k) for k in BOUNDS}
    within = {k: growth[k] <= BOUNDS[k] for k in BOUNDS}
    return {
        "what_ran": (
            f"{end.t / 60:.1f} minutes of real time, one simulated call, {turns} caller turns, {barge_ins} of "
            f"them barge-ins while Annie spoke; LLM and TTS stand-ins over HTTP in child processes"
        ),
        "settings": {"unique_words": args.unique_words, "minutes": args.minutes, "max_turns": args.max_turns, "speech_timeout_ms": args.speech_timeout_ms,
                     "seed": args.seed, "warmup_turns": args.warmup_turns},
        "turns": turns, "barge_ins": barge_ins, "interruption_frames": times.counts["interruption"],
        "unanswered": unanswered, "unanswered_turns": unanswered_turns, "unanswered_detail": unanswered_detail,
        "answered_without_bot_started_frame": unannounced_turns,
        "error_frames": times.counts["error"],
        "start": asdict(first), "after_warmup": asdict(base), "end": asdict(end),
        "growth_after_warmup": growth, "bounds": BOUNDS, "within_bounds": within,
        "samples": [asdict(s) for s in samples],
        **({"tracemalloc": heap_report} if heap_report else {}),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    for ax, key, label in zip(
        axes.flat, ["rss_mb", "fds", "tasks", "threads"], ["RSS (MB)", "open fds", "asyncio tasks", "threads"]
    ):
        ax.plot(t, [s[key] for s in samples], marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes into the call")
    fig.suptitle(f"Soak: {result['turns']} turns, {result['barge_ins']} barge-ins, {result['unanswered']} unanswered")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_heap(result: dict) -> None:
    heap = result["tracemalloc"]
    rss = result["growth_after_warmup"]["rss_mb"]
    py = heap["traced_mb_end"] - heap["traced_mb_after_warmup"]
    print(f"\nafter warm-up: RSS +{rss:.1f} MB, Python heap (tracemalloc) +{py:.2f} MB, "
          f"the rest ({rss - py:.1f} MB) is allocator arenas, native memory and tracemalloc's own tables")
    print("top Python heap growth by line:")
    for row in heap["top_growth_by_line"]:
        print(f"  {row['growth_kb']:>9.1f} KB  {row['count_growth']:>+7} blocks  {row['where']}")
    print("top object growth by type:")
    for row in heap["object_growth_by_type"][:10]:
        print(f"  {row['growth']:>+7}  {row['type']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=14.0, help="wall-clock length of the call")
    parser.add_argument("--max-turns", type=int, default=0, help="stop after this many caller turns (0: no limit)")
    parser.add_argument("--speech-timeout-ms", type=int, default=200, help="USER_SPEECH_TIMEOUT_MS for the run")
    parser.add_argument("--warmup-turns", type=int, default=50)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--label", default="run")
    parser.add_argument(
        "--tracemalloc", action="store_true",
        help="trace Python allocations: snapshot after the warm-up and at the end, report the top growth",
    )
    parser.add_argument("--tracemalloc-frames", type=int, default=1, help="frames kept per allocation (slower when >1)")
    parser.add_argument(
        "--repeat-words", dest="unique_words", action="store_false",
        help="ask only the fixed questions (their words recur in Annie's replies)",
    )
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("SOAK_LOG_LEVEL", "ERROR"))
    result = asyncio.run(soak(args))
    out = REPO / "bench" / "results" / f"soak_{args.label}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"\n{result['what_ran']}")
    print(f"unanswered turns (no audible answer within 10 s): {result['unanswered']}  error frames: {result['error_frames']}")
    print(f"answered, but with no BotStartedSpeakingFrame after the question: "
          f"{len(result['answered_without_bot_started_frame'])} {result['answered_without_bot_started_frame'][:20]}")
    for key in BOUNDS:
        print(f"{key:8} start {result['start'][key]:>8}  after warm-up {result['after_warmup'][key]:>8}  "
              f"end {result['end'][key]:>8}  growth {result['growth_after_warmup'][key]:>7.1f}  "
              f"bound {BOUNDS[key]:>5}  {'ok' if result['within_bounds'][key] else 'EXCEEDED'}")
    print(f"LLM context at the end: {result['end']['context_messages']} messages, {result['end']['context_chars']} chars")
    if "tracemalloc" in result:
        print_heap(result)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if result["unanswered"] == 0 and all(result["within_bounds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

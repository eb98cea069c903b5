"""What the barge-in decision saw and did, as JSON lines, and a replay of it through the core.

A recording is one JSON object per line: events ``{"t", "e": "bot_started" | "bot_stopped" |
"voice_started" | "voice_stopped" | "paused" | "verdict" | "words" | "turn_started" | "tick", ...}``
(``paused``: the playback is silent after a pause; ``bot_started`` carries ``in_flight``, true
when the STT still had the caller's audio to transcribe; ``verdict``: the caller-voice gate's, with
``not_caller``) (words carry
``text``, ``final`` and ``echo``, the words Annie was saying, and ``earlier`` when the STT marked
a final as an utterance's before the pause), and actions ``{"t", "a": "pause" |
"resume" | "commit" | "start_turn" | "reset"}``. ``t`` is seconds from the first line. Replaying
the events through :class:`~agent.bargein.core.BargeInCore`, with a tick wherever the recorded
decision woke up, gives the actions the core takes on the same input, to compare with those
recorded (:func:`compare`). Recordings hold the caller's words: they are for bench runs and
tests, never written by a call unless asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bargein.core import (
    Action,
    BargeInCore,
    BargeInParams,
    Commit,
    Outcome,
    Pause,
    ResetAggregation,
    Resume,
    StartTurn,
)

ACTION_NAMES: dict[type, str] = {
    Pause: "pause", Resume: "resume", Commit: "commit", StartTurn: "start_turn", ResetAggregation: "reset",
}


class EventLog:
    """Collects a live decision's events and actions (times on the strategy's clock)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def event(self, name: str, t: float, **data: Any) -> None:
        self.records.append({"t": t, "e": name, **data})

    def action(self, action: Action, t: float) -> None:
        self.records.append({"t": t, "a": ACTION_NAMES[type(action)]})

    def write(self, path: Path) -> None:
        write_jsonl(self.records, path)


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    t0 = records[0]["t"] if records else 0.0
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({**r, "t": round(r["t"] - t0, 6)}) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class Taken:
    t: float
    action: str


def params_of(records: list[dict[str, Any]]) -> BargeInParams:
    """The parameters a recording was made with (its ``params`` line; defaults for the rest)."""
    for r in records:
        if "params" in r:
            p = r["params"]
            return BargeInParams(window_s=p["window_s"], resume_quiet_s=p["resume_quiet_s"],
                                 resume_backup_ms=p["resume_backup_ms"], backchannels=frozenset(r["backchannels"]))
    return BargeInParams()


def params_record(params: BargeInParams, t: float) -> dict[str, Any]:
    return {"t": t, "params": {"window_s": params.window_s, "resume_quiet_s": params.resume_quiet_s,
                               "resume_backup_ms": params.resume_backup_ms},
            "backchannels": sorted(params.backchannels)}


@dataclass
class Replayed:
    actions: list[Taken]
    flow_diffs: list[str]  # events whose frame went on (or stopped) unlike the recording


def replay(records: list[dict[str, Any]], params: BargeInParams) -> Replayed:
    """The actions the core takes on the recorded events (``WakeAt`` aside)."""
    core = BargeInCore(params)
    taken: list[Taken] = []
    flow_diffs: list[str] = []
    for r in records:
        name, t = r.get("e"), r["t"]
        if name is None:
            continue
        if name == "words":
            out = core.words(t, r["text"], final=r["final"], annies_words=r.get("echo", ()), earlier=r.get("earlier", False))
        elif name == "paused":
            out = core.playback_paused(t)
        elif name == "verdict":
            out = core.voice_verdict(t, r["not_caller"])
        elif name == "bot_started":
            out = core.bot_started(t, caller_audio_in_flight=r.get("in_flight", False))
        elif name in ("bot_stopped", "voice_started", "voice_stopped", "turn_started", "tick"):
            out: Outcome = getattr(core, name)(t)
        else:
            raise ValueError(f"unknown event {name!r} at t={t}")
        taken += [Taken(t, ACTION_NAMES[type(a)]) for a in out.actions if type(a) in ACTION_NAMES]
        if "result" in r and r["result"] != out.flow.value:
            flow_diffs.append(f"{name} at t={t}: recorded {r['result']}, replayed {out.flow.value}")
    return Replayed(taken, flow_diffs)


def recorded_actions(records: list[dict[str, Any]]) -> list[Taken]:
    return [Taken(r["t"], r["a"]) for r in records if "a" in r]


def compare(recorded: list[Taken], replayed: list[Taken], tolerance_s: float) -> list[str]:
    """Differences, one line each: an action missing, extra, different, or off by more than
    ``tolerance_s``. Empty when the two agree."""
    diffs = []
    for i in range(max(len(recorded), len(replayed))):
        a = recorded[i] if i < len(recorded) else None
        b = replayed[i] if i < len(replayed) else None
        if a is None or b is None or a.action != b.action or abs(a.t - b.t) > tolerance_s:
            diffs.append(f"#{i}: recorded {a}, replayed {b}")
    return diffs

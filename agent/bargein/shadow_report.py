"""``python -m agent.bargein.shadow_report [DIR]`` (``bash start.sh report``): is barge-in ready here?

Reads the barge-in shadow records of the last calls (``SHADOW_DIR``, written by
:mod:`agent.bargein.shadow` while the calls were half-duplex) and prints, against stated goals,
what barge-in would have done on this household's own line, and a verdict. ``--png PATH`` draws
the timeline of the latest call (Annie's speech, the caller's voice, each would-be action).

The goals:
- enough evidence: at least 10 minutes of Annie's speech recorded;
- Annie would not stutter for nothing: pauses that would have resumed (her echo, a noise, a
  backchannel) at most 1 per 10 minutes of her speech;
- the caller is heard: would-be commits are listed with the caller's speech over Annie, the
  interruptions half-duplex talked over;
- with the caller-voice gate on (``CALLER_GATE=1``), its verdicts are counted (no goal yet: read
  them beside the pauses that would have resumed).
Exit status: 0 ready, 1 not yet, 2 no usable records.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_EXPOSURE_MIN = 10.0
MAX_RESUMED_PER_10_MIN = 1.0


class RecordError(Exception):
    """A record file that cannot be read; the message says which and why."""


@dataclass
class CallRecord:
    path: Path
    actions: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def read_call(path: Path) -> CallRecord:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise RecordError(f"{path}: cannot be read ({e.strerror or e})") from e
    call = CallRecord(path)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}, line {number}: not a shadow record ({e.msg})") from e
        if not isinstance(record, dict):
            raise RecordError(f"{path}, line {number}: not a shadow record")
        if "summary" in record:
            call.summary = record["summary"]
        elif "a" in record or "span" in record or "gate" in record:
            call.actions.append(record)
    if not call.summary:
        raise RecordError(f"{path}: no summary line (the call did not end cleanly, or this is not a shadow record)")
    return call


def read_calls(directory: Path, last: int) -> tuple[list[CallRecord], list[str]]:
    """The last ``last`` calls' records, and one line for each file that could not be used."""
    if not directory.is_dir():
        raise RecordError(f"{directory}: no such directory (is BARGE_IN_SHADOW on, and SHADOW_DIR this folder?)")
    calls, problems = [], []
    for path in sorted(directory.glob("shadow-*.jsonl"))[-last:]:
        try:
            calls.append(read_call(path))
        except RecordError as e:
            problems.append(str(e))
    return calls, problems


@dataclass
class Verdict:
    lines: list[str]
    ready: bool


def verdict(calls: list[CallRecord]) -> Verdict:
    minutes = sum(c.summary.get("annie_speech_min", 0.0) for c in calls)
    pauses = sum(c.summary.get("would_pause", 0) for c in calls)
    resumed = sum(c.summary.get("would_resume", 0) for c in calls)
    commits = sum(c.summary.get("would_commit", 0) for c in calls)
    over = sum(c.summary.get("caller_over_annie_s", 0.0) for c in calls)
    per10 = 10 * resumed / minutes if minutes > 0 else None
    enough = minutes >= MIN_EXPOSURE_MIN
    quiet = per10 is not None and per10 <= MAX_RESUMED_PER_10_MIN
    lines = [
        f"calls: {len(calls)}, Annie's speech: {minutes:.1f} min",
        f"evidence: {minutes:.1f} of {MIN_EXPOSURE_MIN:g} min of Annie's speech: {'ok' if enough else 'not enough yet'}",
        "pauses for nothing (echo, noise, backchannel; would have resumed): "
        + (f"{resumed} = {per10:.1f} per 10 min of Annie's speech, goal <= {MAX_RESUMED_PER_10_MIN:g}: "
           f"{'ok' if quiet else 'too many'}" if per10 is not None else "no speech of Annie's recorded"),
        f"would-be pauses: {pauses}; would-be interruptions (commits): {commits}; "
        f"the caller's voice over Annie: {over:.1f} s (half-duplex talked over it)",
    ]
    gated = [c.summary for c in calls if "gate_unsure" in c.summary]
    if gated:  # CALLER_GATE was on in some calls: its verdicts on the sounds over Annie
        n = {v: sum(g.get(f"gate_{v}", 0) for g in gated) for v in ("caller", "not_caller", "unsure")}
        lines.append(f"caller-voice gate ({len(gated)} of {len(calls)} calls): the caller {n['caller']}, "
                     f"not the caller {n['not_caller']} (would resume at once), unsure {n['unsure']}")
    ready = enough and quiet
    lines.append("verdict: " + ("barge-in would behave on this line; ENABLE_BARGE_IN=1 is supported by the evidence"
                                if ready else "keep ENABLE_BARGE_IN=0 for now"))
    return Verdict(lines, ready)


def draw_timeline(call: CallRecord, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans: dict[str, list[tuple[float, float]]] = {"annie": [], "voice": []}
    opened: dict[str, float] = {}
    end = max((r["t"] for r in call.actions), default=1.0)
    for r in call.actions:
        what = r.get("span")
        if what in ("annie", "voice"):
            opened[what] = r["t"]
        elif what in ("annie_end", "voice_end") and what[:-4] in opened:
            spans[what[:-4]].append((opened.pop(what[:-4]), r["t"]))
    for what, since in opened.items():
        spans[what].append((since, end))
    fig, ax = plt.subplots(figsize=(12, 3.2))
    for row, (what, label, color) in enumerate((("annie", "Annie speaks", "tab:blue"), ("voice", "caller's voice", "tab:green"))):
        ax.broken_barh([(a, b - a) for a, b in spans[what]], (row * 10 + 1, 8), color=color, label=label)
    marks = {"pause": ("|", "tab:orange"), "resume": ("v", "tab:gray"), "commit": ("*", "tab:red")}
    for action, (marker, color) in marks.items():
        times = [r["t"] for r in call.actions if r.get("a") == action]
        ax.scatter(times, [25] * len(times), marker=marker, color=color, label=f"would {action}", zorder=3)
    gate = {"caller": ("o", "tab:green"), "not_caller": ("x", "tab:purple"), "unsure": (".", "tab:gray")}
    for verdict, (marker, color) in gate.items():
        times = [r["t"] for r in call.actions if r.get("gate") == verdict]
        if times:
            ax.scatter(times, [35] * len(times), marker=marker, color=color, label=f"gate: {verdict.replace('_', ' ')}",
                       zorder=3)
    rows = ["Annie", "caller", "decision"] + (["gate"] if any("gate" in r for r in call.actions) else [])
    ax.set_yticks([5, 15, 25, 35][: len(rows)], rows)
    ax.set_xlabel("seconds into the call")
    ax.set_title(f"barge-in shadow: {call.path.name}")
    # below the axes: inside, it hid the decisions row (a shadow demo run, 2026-12-07)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), fontsize=7, ncol=5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", type=Path, default=None, help="SHADOW_DIR (default: the setting)")
    parser.add_argument("--last", type=int, default=50, help="how many of the latest calls to read")
    parser.add_argument("--png", type=Path, default=None, help="draw the latest call's timeline here")
    args = parser.parse_args(argv)
    directory = args.directory
    if directory is None:
        from agent.config import ConfigError, load_settings

        try:
            directory = load_settings().shadow_dir
        except ConfigError as e:
            print(f"report: {e}", file=sys.stderr)
            return 2
    try:
        calls, problems = read_calls(directory, args.last)
    except RecordError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"report: skipped {problem}", file=sys.stderr)
    if not calls:
        print(f"report: no shadow records in {directory} (turn on BARGE_IN_SHADOW=1 and make some calls)", file=sys.stderr)
        return 2
    result = verdict(calls)
    print("\n".join(result.lines))
    if args.png is not None:
        try:
            draw_timeline(calls[-1], args.png)
            print(f"timeline of the latest call: {args.png}")
        except ImportError:
            print("report: no timeline (matplotlib is not installed: pip install -e '.[bench]')", file=sys.stderr)
    return 0 if result.ready else 1


if __name__ == "__main__":
    raise SystemExit(main())

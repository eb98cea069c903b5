"""Same decisions as before the core existed, proven by replay.

``tests/data/bargein/*-e50c617.jsonl`` were recorded from the barge-in strategy as it was at
e50c617 (before the decision moved into :mod:`agent.bargein.core`), during a full ``sim-pause``
and ``rig-pause`` run of ``bench.bargein_bench`` (Whisper tiny.en with partials, the stand-in LLM,
Piper): every frame it was given with its time, the words Annie was saying, the times its
deadline timer woke up, and every action it took. The core, replayed on those events with their
times as its clock, must take the same actions within one tick (a 20 ms audio frame) and stop
the same frames. A later change to the rules shows up here as a diff; record anew
(``python -m bench.bargein_bench --record-dir DIR``) when it is meant.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from agent.bargein.recording import compare, params_of, read_jsonl, recorded_actions, replay

DATA = Path(__file__).resolve().parent / "data" / "bargein"
TICK_S = 0.020
RECORDINGS = sorted(DATA.glob("*.jsonl"))


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_the_core_takes_the_recorded_actions_at_the_recorded_times(path):
    records = read_jsonl(path)
    recorded = recorded_actions(records)
    replayed = replay(records, params_of(records))
    kinds = Counter(a.action for a in recorded)
    assert kinds["pause"] >= 5 and kinds["resume"] >= 3 and kinds["commit"] >= 3, f"a thin recording: {kinds}"
    diffs = compare(recorded, replayed.actions, TICK_S)
    assert diffs == [], f"{len(diffs)} of {len(recorded)} actions differ:\n" + "\n".join(diffs[:20])
    assert replayed.flow_diffs == []


def test_the_replay_sees_a_changed_rule():
    """A core with a shorter window decides differently on the same recording: the check bites."""
    from dataclasses import replace

    records = read_jsonl(RECORDINGS[0])
    params = replace(params_of(records), window_s=0.4, resume_quiet_s=0.05)
    assert compare(recorded_actions(records), replay(records, params).actions, TICK_S) != []

"""Run from the repo root: PYTHONPATH=. python bench/results/lines_aec3_marks_2026-12-07/replay_without_marks.py

Replay run B's decision records with and without the earlier-final marks: which actions change."""
import sys
from collections import Counter
from agent.bargein.recording import read_jsonl, params_of, replay, recorded_actions, compare
from pathlib import Path
for f in sorted(Path("bench/results/lines_aec3_marks_2026-12-07/decisions").glob("*.jsonl")):
    recs = read_jsonl(f)
    params = params_of(recs)
    with_marks = replay(recs, params)
    without = replay([{k: v for k, v in r.items() if k != "earlier"} for r in recs], params)
    rec = recorded_actions(recs)
    marked = sum(1 for r in recs if r.get("earlier"))
    print(f.name, "earlier finals:", marked, "| recorded vs replay (marks):", len(compare(rec, with_marks.actions, 0.01)), "diffs",
          "| replay without marks:", Counter(t.action for t in without.actions), "with:", Counter(t.action for t in with_marks.actions))
    for line in compare(with_marks.actions, without.actions, 0.01)[:6]:
        print("   ", line)

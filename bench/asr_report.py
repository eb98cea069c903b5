"""The ASR bench's report: a line per row as it runs, the markdown table, the plot, the operator's lines."""

from __future__ import annotations

from pathlib import Path

FOOTNOTE = ("final: from the last audio handed to the backend to its final text (the VAD's stop wait comes on top, "
            "the same for every backend); partial right: when the streaming partial first had the final's words, "
            "from the end of speech (negative: before it), median over the utterances where it did (k/n).")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _wer(row: dict) -> str:
    return f"{100 * row['wer']:.1f} %"


def _partial(row: dict) -> str:
    if row["partial_right_n"] is None:
        return "-"
    if row["partial_right_n"] == 0:
        return f"never (0/{row['n']})"
    return f"{_ms(row['partial_right_p50_ms'])} ms ({row['partial_right_n']}/{row['n']})"


def row_line(row: dict) -> str:
    failed = f", {row['failed']} failed" if row["failed"] else ""
    partial = f", partial right {_partial(row)}" if row["partial_right_n"] is not None else ""
    return (f"{row['backend']:>18} {row['line']:>10}: WER {_wer(row):>8} (S {row['substitutions']}, D {row['deletions']}, "
            f"I {row['insertions']} of {row['reference_words']}), final p50 {_ms(row['final_p50_ms'])} ms / p95 "
            f"{_ms(row['final_p95_ms'])} ms, RTF {row['rtf']:.3f}{partial}{failed}")


def table(rows: list[dict]) -> str:
    out = ["| backend | line | n | WER | S / D / I of words | final p50 / p95 (ms) | RTF | partial right (k/n) | failed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['backend']} | {r['line']} | {r['n']} | {_wer(r)} | {r['substitutions']} / {r['deletions']} / "
                   f"{r['insertions']} of {r['reference_words']} | {_ms(r['final_p50_ms'])} / {_ms(r['final_p95_ms'])} | "
                   f"{r['rtf']:.3f} | {_partial(r)} | {r['failed']} |")
    return "\n".join(out)


def decision_lines(results: dict) -> list[str]:
    """Per phone line (clean only where no phone line ran): each chunk size beside the sidecar and Whisper."""
    lines = [line for line in results["lines"] if line != "clean"] or results["lines"]
    out = []
    for line in lines:
        rows = [r for r in results["rows"] if r["line"] == line]
        words = rows[0]["reference_words"] if rows else 0
        warning = "; nemotron is the tiny RANDOM model: its WER means nothing" if results["tiny_model"] else ""
        out.append(f"== ASR_CHUNK_MS on a {line} line ({results['utterances']} utterances, {words} words{warning}) ==")
        for r in rows:
            partial = f", partial right {_partial(r)}" if r["partial_right_n"] is not None else ""
            failed = f", {r['failed']} failed" if r["failed"] else ""
            out.append(f"  {r['backend']:<18} WER {_wer(r):>8}   final p50 {_ms(r['final_p50_ms']):>5} ms, "
                       f"p95 {_ms(r['final_p95_ms']):>5} ms{partial}{failed}")
    for skipped in results["not_run"]:
        out.append(f"  {skipped['backend']:<18} not run: {skipped['reason']}")
    if results["skipped"]:
        out.append(f"  skipped {len(results['skipped'])} manifest line(s): "
                   + "; ".join(f"{s['name']} ({s['reason'].split(' at ')[0]})" for s in results["skipped"]))
    out.append(f"  ({FOOTNOTE})")
    return out


def write_markdown(results: dict, path: Path) -> Path:
    parts = [
        f"# ASR WER and time to final, {results['date']}",
        "",
        f"Manifest `{results['manifest']}`: {results['utterances']} utterances, {results['audio_s']} s of audio; "
        f"nemotron model: {results['nemotron_model']}; {results['device']}; normaliser {results['normalizer']}"
        + ("; chunks handed over in real time" if results["realtime"] else "; chunks handed over as fast as processed") + ".",
        "",
        table(results["rows"]),
        "",
        FOOTNOTE,
    ]
    if results["not_run"]:
        parts += ["", "Not run:"] + [f"- {s['backend']}: {s['reason']}" for s in results["not_run"]]
    if results["skipped"]:
        parts += ["", "Skipped manifest lines:"] + [f"- line {s['line']} ({s['name']}): {s['reason']}" for s in results["skipped"]]
    path.write_text("\n".join(parts) + "\n")
    return path


def plot(results: dict, path: Path) -> Path:
    """WER against time to final, one panel per line: the chunk sizes as a curve, the others as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(results["lines"]), figsize=(5.5 * len(results["lines"]), 4.5), squeeze=False)
    for ax, line in zip(axes[0], results["lines"]):
        rows = [r for r in results["rows"] if r["line"] == line]
        stream = [r for r in rows if r["kind"] == "nemotron"]
        if stream:
            x, y = [r["final_p50_ms"] for r in stream], [100 * r["wer"] for r in stream]
            ax.plot(x, y, marker="o", label="nemotron (chunk ms)")
            ax.errorbar(x, y, xerr=[[0] * len(stream), [r["final_p95_ms"] - r["final_p50_ms"] for r in stream]], fmt="none", alpha=0.4)
            for r, xi, yi in zip(stream, x, y):
                ax.annotate(str(r["chunk_ms"]), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for marker, r in zip("s^D", [r for r in rows if r["kind"] != "nemotron"]):
            ax.errorbar([r["final_p50_ms"]], [100 * r["wer"]], xerr=[[0], [r["final_p95_ms"] - r["final_p50_ms"]]],
                        marker=marker, ls="none", label=r["backend"])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("time to final, ms (p50, bar to p95)")
        ax.set_ylabel("WER %")
        ax.set_title(f"{line} line, n={results['utterances']}", fontsize=9)
        ax.legend(fontsize=8)
    title = f"{Path(results['manifest']).name}; nemotron: {results['nemotron_model']}; {results['device']}"
    fig.suptitle(title if len(title) < 140 else title[:137] + "...", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The barge-in benchmark's report: JSON, a markdown table with every target, and two plots."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = "stop latency p95 <= 200 ms; 0 false barge-ins in 10 min of echo-only speech; >= 98 % of interruptions stop Annie; 0 stale chunks; >= 95 % of noise bursts and backchannels resumed; 0 interruptions wrongly resumed"


def _f(x, fmt: str = "{:.0f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f} %)" if n else "0/0"


def targets(p: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for one pass."""
    s = p["summary"]
    rows = []
    p95 = s["stop_latency"]["p95_ms"]
    rows.append(("stop latency p95 <= 200 ms", f"{_f(p95)} ms (median {_f(s['stop_latency']['median_ms'])}, n={s['stop_latency']['n']})",
                 "-" if p95 is None else ("met" if p95 <= 200 else f"missed by {p95 - 200:.0f} ms")))
    n, k = s["interruptions"], s["barge_in_success"]
    rows.append((">= 98 % of interruptions stop Annie", _rate(k, n),
                 "-" if not n else ("met" if k / n >= 0.98 else f"missed by {98 - 100 * k / n:.0f} points")))
    rows.append(("0 stale chunks", f"{s['stale_chunks']} chunks, {s['stale_s']:.2f} s of speech",
                 "met" if s["stale_chunks"] == 0 and s["stale_s"] < 0.05 else "missed"))
    e = s["echo_only"]
    mins = e["annie_speech_without_caller_s"] / 60
    verdict = "met" if e["false_barge_ins"] == 0 else f"missed ({e['false_barge_ins']} false)"
    if not p["has_echo"]:
        verdict = "not measurable (no echo on this line)"
    elif mins < 10:
        verdict += f" (scaled down: {mins:.1f} of 10 min)"
    rows.append(("0 false barge-ins in 10 min echo-only", f"{e['false_barge_ins']} in {mins:.1f} min of Annie's speech"
                 + (f" ({e['false_pauses']} pauses" + (f", {_f(e['false_pause_ms']['median_ms'])} ms median"
                                                      if e.get("false_pause_ms", {}).get("n") else "") + ")"
                    if p["pause_first"] else ""), verdict))
    bb = [s["backchannel"], s["burst"]]
    ev = sum(g["events"] for g in bb)
    kept = sum(g["kept_talking"] for g in bb)
    resumed = sum(g["resumed"] for g in bb)
    trig = sum(g["triggered"] for g in bb)
    rows.append((">= 95 % of noise bursts and backchannels: Annie goes on",
                 f"{_rate(kept, ev)} went on; {resumed} of {trig} pauses/stops resumed",
                 "-" if not ev else ("met" if kept / ev >= 0.95 else f"missed by {95 - 100 * kept / ev:.0f} points")))
    rows.append(("0 interruptions wrongly resumed", str(s["wrongly_resumed"]),
                 "met" if s["wrongly_resumed"] == 0 else f"missed ({s['wrongly_resumed']})"))
    gaps = s["backchannel"]["resume_gaps_samples"] + s["burst"]["resume_gaps_samples"]
    if p["pause_first"]:
        bad = [g for g in gaps if g != 0]
        rows.append(("0 samples lost or repeated at a resume", f"{len(gaps) - len(bad)} of {len(gaps)} resumes exact"
                     + (f"; off by {', '.join(str(g) for g in bad)} samples" if bad else ""),
                     "met" if gaps and not bad else ("-" if not gaps else "missed")))
    return rows


ANNIE_DBFS = -17.0  # Piper's level at the sink, for the echo-against-caller figure


def _verdicts(p: dict, sources: tuple[str, ...]) -> str:
    if not p.get("caller_gate"):
        return "-"
    by = p["caller_gate"]["by_source"]
    return " / ".join(str(sum(by.get(src, {}).get(v, 0) for src in sources)) for v in ("caller", "not_caller", "unsure"))


def side_by_side(results: dict) -> list[str]:
    """One table per line preset: the metrics of issue 19, one column per canceller."""
    by_preset: dict[str, list[dict]] = {}
    for p in results["passes"]:
        if p.get("preset"):
            by_preset.setdefault(p["preset"], []).append(p)
    out: list[str] = []
    for name, passes in by_preset.items():
        model = passes[0]["line_model"]
        erl = model["echo_return_loss_db"]
        vs = None if erl is None else ANNIE_DBFS - erl - model["caller_dbfs"]
        out += ["", f"### Line `{name}`: echo {model['echo_delay_ms']:.0f} ms, "
                + ("no echo" if erl is None else f"{erl:g} dB below Annie (about {vs:+.0f} dB against the caller)")
                + f", {model['band']}, caller {model['caller_dbfs']:g} dBFS, room {model['room']}", "",
                "| metric | " + " | ".join(p["canceller"] + (" + gate" if p.get("caller_gate") else "") for p in passes) + " |",
                "|---|" + "---|" * len(passes)]
        rows: dict[str, list[str]] = {}

        def add(label: str, values: list[str]) -> None:
            rows[label] = values

        lm = [p.get("line_metrics") or {} for p in passes]
        add("ERLE on echo only, pooled / median 100 ms block (blocks; raw echo level)",
            [f"{_f(m.get('erle', {}).get('pooled_db'), '{:.1f}')} / {_f(m.get('erle', {}).get('median_db'), '{:.1f}')} dB "
             f"({m.get('erle', {}).get('blocks', 0)}; {_f(m.get('erle', {}).get('raw_echo_dbfs'), '{:.0f}')} dBFS)" for m in lm])
        add("caller's first 300 ms lost under double talk, median / p90 (n)",
            [f"{_f(m.get('onset_loss', {}).get('median_db'), '{:.1f}')} / {_f(m.get('onset_loss', {}).get('p90_db'), '{:.1f}')} dB "
             f"({m.get('onset_loss', {}).get('n', 0)})" for m in lm])
        ss = [p["summary"] for p in passes]
        add("detect latency median / p95 (n)", [f"{_f(s['detect_latency']['median_ms'])} / {_f(s['detect_latency']['p95_ms'])} ms "
                                                f"({s['detect_latency']['n']})" for s in ss])
        add("stop latency median / p95 (n)", [f"{_f(s['stop_latency']['median_ms'])} / {_f(s['stop_latency']['p95_ms'])} ms "
                                              f"({s['stop_latency']['n']})" for s in ss])
        add("interruptions that stopped Annie", [_rate(s["barge_in_success"], s["interruptions"]) for s in ss])

        def per_min(s: dict, key: str) -> str:
            e = s["echo_only"]
            mins = e["annie_speech_without_caller_s"] / 60
            return f"{e[key] / mins:.1f}/min ({e[key]} in {mins:.1f} min)" if mins > 0 else "-"

        add("echo only: false pauses", [per_min(s, "false_pauses") for s in ss])
        add("echo only: false barge-ins", [per_min(s, "false_barge_ins") for s in ss])
        went_on = []
        for s in ss:
            groups = [s["backchannel"], s["burst"], s["noise"]]
            went_on.append(_rate(sum(g["kept_talking"] for g in groups), sum(g["events"] for g in groups)))
        add("backchannels, bursts and room noise: Annie went on", went_on)
        add("interruptions wrongly resumed", [f"{s['wrongly_resumed']} of {s['interruptions']}" for s in ss])
        add("backchannels: Annie went on", [_rate(s["backchannel"]["kept_talking"], s["backchannel"]["events"]) for s in ss])
        voices = [[d for d in s["noise_by_snr"] if d["kind"] in ("tv", "second_voice") and d["snr_db"] >= 5] for s in ss]
        add("TV and second voice >= 5 dB below the caller: stopped Annie",
            [_rate(sum(d["false_barge_ins"] for d in v), sum(d["events"] for d in v)) for v in voices])
        if any(p.get("caller_gate") for p in passes):
            add("caller's voice (enrolled s)", [f"{p.get('caller_voice') or 'one per utterance'}"
                                                + (f" ({p['caller_gate']['enrolled_s']:g} s)" if p.get("caller_gate") else "")
                                                for p in passes])
            for label, sources in (("interruptions and backchannels", ("interruption", "backchannel")),
                                   ("TV, second voice, babble", ("tv", "second_voice", "babble")), ("echo only", ("echo",))):
                add(f"gate on {label}: caller / not caller / unsure", [_verdicts(p, sources) for p in passes])
        out += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows.items()]
    if out:
        out = ["## Phone lines, canceller against canceller (pause first)", "",
               "Goals per preset: stop latency p95 <= 200 ms where the echo is at least 5 dB below the caller; "
               "0 false barge-ins per 10 min of echo; >= 95 % of backchannels and noise go on; 0 wrongly resumed."] + out
    return out


def markdown(results: dict) -> str:
    out = ["# Barge-in benchmark results", "",
           f"Command: `{results.get('command', 'python -m bench.bargein_bench')}` ({results.get('wall_s', 0):.0f} s wall, "
           f"{results['machine']['cpus']} CPUs, load at start {results['machine']['load_avg_at_start'][0]:.1f})", "",
           "- STT: " + ("; ".join(sorted({p["stt"] for p in results["passes"]})) or "none"),
           f"- LLM: {results.get('llm')}", f"- TTS: {results.get('tts')}", ""]
    for name, why in results.get("skipped", {}).items():
        out.append(f"- **{name} not run**: {why}")
    out += side_by_side(results)
    for p in results["passes"]:
        s = p["summary"]
        out += ["", f"## {p['pass']}: {p['line']}", "",
                f"Barge-in: {'pause first, then decide (issue 10)' if p['pause_first'] else 'stop at the first sound (cancel)'}; "
                f"VAD start {p.get('vad_start_ms', 200)} ms, min volume {p.get('vad_min_volume', 0.6)}, "
                f"BARGE_IN_DECIDE_MS={p.get('barge_in_decide_ms', 800)}; "
                f"STT {p['stt']}; {p['duration_s']:.0f} s of call.", "",
                "| target | measured | verdict |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in targets(p)]
        out += ["", "| metric | value |", "|---|---|",
                f"| detect latency (onset -> pause/interruption frame), median / p95 | {_f(s['detect_latency']['median_ms'])} / {_f(s['detect_latency']['p95_ms'])} ms |",
                *([f"| VAD alone on the recorded agent input (offline, same parameters), median / p95 | "
                   f"{_f(s['offline_vad_latency']['median_ms'])} / {_f(s['offline_vad_latency']['p95_ms'])} ms "
                   f"({s.get('offline_vad_missed', 0)} never started) |"] if s.get("offline_vad_latency", {}).get("n") else []),
                *([f"| the pipeline's VAD start minus the offline one (host load), median / p95 (n; over 100 ms) | "
                   f"{_f(s['vad_pipeline_lag']['median_ms'])} / {_f(s['vad_pipeline_lag']['p95_ms'])} ms "
                   f"({s['vad_pipeline_lag']['n']}; {s['vad_pipeline_lag']['over_100ms']}) |"] if s.get("vad_pipeline_lag", {}).get("n") else []),
                f"| response latency after an interruption (FD-Bench), median / p95 | {_f(s['response_latency']['median_ms'])} / {_f(s['response_latency']['p95_ms'])} ms |",
                f"| voice-to-voice, median / p95 (n) | {_f(s['voice_to_voice']['median_ms'])} / {_f(s['voice_to_voice']['p95_ms'])} ms ({s['voice_to_voice']['n']}; {s.get('questions_not_answered', 0)} not answered within 8 s) |",
                "| voice-to-voice stages (median ms) | " + ", ".join(f"{k} {_f(v)}" for k, v in s["voice_to_voice_stages_median_ms"].items()) + " |",
                f"| our code vs servers (median stages) | {_f(s['voice_to_voice_share']['our_code_ms'])} ms ours, {_f(s['voice_to_voice_share']['servers_ms'])} ms servers ({_f((s['voice_to_voice_share']['our_share'] or 0) * 100)} % ours) |"]
        for g in ("backchannel", "burst", "noise"):
            d = s[g]
            out.append(f"| {g}: events / triggered / false barge-ins / resumed | {d['events']} / {d['triggered']} / {d['false_barge_ins']} / {d['resumed']} |")
        out.append(f"| interruptions not answered within 8 s (the STT gave no words) | {s.get('interruptions_not_answered', 0)} of {s['interruptions']} |")
        quiet = [r for r in p["events"] if r["group"] in ("backchannel", "burst") and r["annie_speaking"]]
        if quiet:
            out += ["", "| backchannel / burst | STT heard | decisions | outcome |", "|---|---|---|---|"]
            for r in quiet:
                outcome = ("resumed" if r["resumed"] else "went on" if r["kept_talking"] else "Annie stopped (false barge-in)")
                out.append(f"| {r['text'] or r['kind']} | {r.get('heard') or '-'} | {', '.join(r['decisions']) or '-'} | {outcome} |")
        if s["noise_by_snr"]:
            out += ["", "| noise @ SNR | events | triggered (pause or stop) | false barge-ins |", "|---|---|---|---|"]
            out += [f"| {d['kind']} @ {d['snr_db']:g} dB | {d['events']} | {d['triggered']} | {d['false_barge_ins']} |" for d in s["noise_by_snr"]]
    return "\n".join(out) + "\n"


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    passes = results["passes"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, title) in zip(axes, (("stop_latency_ms", "stop latency (onset -> Annie silent at the ear)"),
                                       ("response_latency_ms", "response after an interruption"),
                                       ("voice_to_voice_ms", "voice-to-voice (question end -> audible)"))):
        data, labels = [], []
        for p in passes:
            vals = [r[key] for r in p["events"] if r.get(key) is not None and (key != "stop_latency_ms" or r.get("success"))
                    and not r.get("warmup") and (key != "voice_to_voice_ms" or r[key] <= 8000)]
            if vals:
                data.append(vals)
                labels.append(f"{p['pass']}\n(n={len(vals)})")
        if data:
            ax.boxplot(data, whis=(5, 95))
            ax.set_xticks(range(1, len(data) + 1), labels, fontsize=8)
            for i, vals in enumerate(data, 1):
                ax.plot([i] * len(vals), vals, ".", alpha=0.5)
        if key == "stop_latency_ms":
            ax.axhline(200, color="red", ls="--", lw=1, label="target p95 200 ms")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("ms")
    fig.tight_layout()
    paths.append(out / "bargein_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for p in passes:
        rows = p["summary"]["noise_by_snr"]
        snrs = sorted({d["snr_db"] for d in rows}, reverse=True)
        if not snrs:
            continue
        pooled = [[d for d in rows if d["snr_db"] == snr] for snr in snrs]
        n = [sum(d["events"] for d in group) for group in pooled]
        false = [sum(d["false_barge_ins"] for d in g) / k for g, k in zip(pooled, n)]
        trig = [sum(d["triggered"] for d in g) / k for g, k in zip(pooled, n)]
        line = ax.plot(snrs, false, "o-", label=f"{p['pass']}: false barge-in")[0]
        ax.plot(snrs, trig, "x:", color=line.get_color(), label=f"{p['pass']}: paused or stopped")
        for x, y, k in zip(snrs, false, n):
            ax.annotate(f"n={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("SNR against the caller's nominal level (dB)")
    ax.set_ylabel("share of events")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Babble, TV and a second voice during Annie's speech (kinds pooled)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "bargein_snr.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(results: dict, out: Path) -> list[Path]:
    """Summaries (recomputed from the per-event records), targets, JSON, markdown and plots."""
    from bench.bargein_metrics import summarize

    out.mkdir(parents=True, exist_ok=True)
    for p in results["passes"]:
        p["summary"] = summarize(p["events"], p["summary"]["echo_only"])
        p["targets"] = [{"target": a, "measured": b, "verdict": c} for a, b, c in targets(p)]
    paths = [out / "bargein_results.json", out / "bargein_results.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=float))
    paths[1].write_text(markdown(results))
    try:
        paths += plot(results, out)
    except ImportError:
        pass  # matplotlib is in the bench extra; the JSON and markdown are enough without it
    return paths


def main() -> None:
    """``python -m bench.bargein_report [results.json]``: rebuild the report from the saved records."""
    import sys

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "bargein_results.json"
    for written in write_report(json.loads(path.read_text()), path.parent):
        print(f"wrote {written}")


if __name__ == "__main__":
    main()

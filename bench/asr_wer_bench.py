"""WER and time to the final per STT backend and chunk size, on a manifest, clean and through the phone band.

    python -m bench.asr_wer_bench                                   # synthesized set, tiny random model, Whisper
    python -m bench.asr_wer_bench --manifest test_clean.jsonl --nemo /models/nemotron.nemo --device cuda

The operator's choice of ``ASR_CHUNK_MS`` (80/160/560/1120 ms) set against what runs today: the
Parakeet HTTP sidecar (when ``PARAKEET_URL`` is set; ``INTERNAL_TOKEN`` and
``PARAKEET_REQUEST_FORMAT`` as for the agent) and Whisper (bundled tiny.en, or
``WHISPER_MODEL_PATH``). Each utterance of a NeMo JSON-lines manifest (see
:mod:`bench.asr_manifest`; without ``--manifest`` a small one is synthesized, see
:mod:`bench.asr_synth`) goes through every backend, once per line condition (``--lines``: clean,
narrowband, wideband; see :mod:`bench.phone_band`). The streaming engine gets the audio one chunk
at a time and is finalized after the last chunk (:mod:`bench.asr_backends`).

Per backend, chunk size and line: WER on normalised text (:mod:`bench.wer`), time from the last
audio to the final (median, p95), real-time factor (backend wall time over audio time) and, for
the streaming engine, when the partial first had the final's words (from the end of speech;
negative is before it). Writes ``OUT/LABEL.json``, ``.md`` and ``.png``; ends with the lines an
operator needs to choose. Lines of the manifest that cannot be used are listed and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.asr_backends import Heard, load_nemotron, load_parakeet, load_whisper
from bench.asr_manifest import load_manifest
from bench.asr_report import decision_lines, plot, row_line, write_markdown
from bench.phone_band import LINES, phone_band
from bench.wer import NORMALIZERS, corpus_errors, normalizer, word_errors
from processors.errors import SetupError

RESULTS = Path(__file__).resolve().parent / "results"
CHUNKS = (80, 160, 560, 1120)
BACKENDS = ("nemotron", "parakeet", "whisper")
TINY = "tiny"


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summarize(backend, line: str, utterances, heard: list[Heard], norm) -> dict:
    """One table row: the backend on one line condition, with every utterance's result."""
    errors = corpus_errors(((u.text, h.text) for u, h in zip(utterances, heard)), norm)
    lead = [h.partial_right_ms for h in heard if h.partial_right_ms is not None]
    audio_s = sum(u.seconds for u in utterances)
    return {
        "backend": backend.name,
        "kind": backend.kind,
        "chunk_ms": backend.chunk_ms,
        "line": line,
        "n": len(heard),
        "reference_words": errors.reference_words,
        "wer": round(errors.wer, 4),
        "substitutions": errors.substitutions,
        "deletions": errors.deletions,
        "insertions": errors.insertions,
        "final_p50_ms": percentile([h.final_ms for h in heard], 50),
        "final_p95_ms": percentile([h.final_ms for h in heard], 95),
        "rtf": round(sum(h.compute_ms for h in heard) / 1e3 / audio_s, 4),
        "partial_right_p50_ms": percentile(lead, 50) if backend.kind == "nemotron" else None,
        "partial_right_n": len(lead) if backend.kind == "nemotron" else None,
        "failed": sum(h.error is not None for h in heard),
        "utterances": [
            {"key": u.key, "reference": u.text, "heard": h.text, "wer": round(word_errors(u.text, h.text, norm).wer, 4),
             "final_ms": round(h.final_ms, 2), "compute_ms": round(h.compute_ms, 2), "audio_s": round(u.seconds, 3),
             "partial_right_ms": None if h.partial_right_ms is None else round(h.partial_right_ms, 1),
             "partials": h.partials, "error": h.error}
            for u, h in zip(utterances, heard)
        ],
    }


def plan(args, norm, tmp: Path) -> list[tuple[str, object]]:
    """(name, make backend) in the order they run; a make raises SetupError/ImportError when it cannot."""
    out: list[tuple[str, object]] = []
    if "nemotron" in args.backends:
        nemo = [args.nemo]

        def path() -> Path:
            if nemo[0] == TINY:
                from bench.nemo_models import tiny_nemo_once

                nemo[0] = tiny_nemo_once(tmp)
            return Path(nemo[0])

        for chunk_ms in args.chunks:
            out.append((f"nemotron {chunk_ms} ms", lambda c=chunk_ms: load_nemotron(path(), c, args.device, args.precision, norm, args.realtime)))
    if "parakeet" in args.backends:
        def parakeet():
            url = os.environ.get("PARAKEET_URL")
            if not url:
                raise SetupError("PARAKEET_URL is not set (the sidecar's endpoint, e.g. http://127.0.0.1:8001/transcribe)")
            return load_parakeet(url, os.environ.get("INTERNAL_TOKEN") or None, os.environ.get("PARAKEET_REQUEST_FORMAT", "multipart"))

        out.append(("parakeet sidecar", parakeet))
    if "whisper" in args.backends:
        out.append(("whisper", lambda: load_whisper(args.whisper, args.device)))
    return out


def model_label(args) -> str:
    if "nemotron" not in args.backends:
        return "none"
    if args.nemo == TINY:
        return "tiny RANDOM test model (WER meaningless, timings not the real model's)"
    return Path(args.nemo).name


def run(args) -> dict:
    norm = normalizer(args.normalizer)
    with tempfile.TemporaryDirectory(prefix="asr-wer-") as tmp:
        manifest = args.manifest
        if manifest is None:
            from bench.asr_synth import synthesize_manifest

            manifest = synthesize_manifest(args.out / f"{args.label}_synth")
            print(f"# synthesized {manifest}", flush=True)
        if not Path(manifest).is_file():
            raise SystemExit(f"The manifest {manifest} does not exist: nothing to measure.")
        utterances, skipped = load_manifest(Path(manifest), args.limit)
        for s in skipped:
            print(f"skipped {s}", flush=True)
        if not utterances:
            detail = f"all {len(skipped)} of its lines were skipped (listed above)" if skipped else "it has no lines"
            raise SystemExit(f"The manifest {manifest} has no usable utterance ({detail}): nothing to measure.")
        results = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "manifest": str(manifest),
            "utterances": len(utterances),
            "audio_s": round(sum(u.seconds for u in utterances), 2),
            "skipped": [vars(s) for s in skipped],
            "lines": args.lines,
            "nemotron_model": model_label(args),
            "tiny_model": args.nemo == TINY and "nemotron" in args.backends,
            "device": device_label(args.device),
            "normalizer": args.normalizer,
            "realtime": args.realtime,
            "rows": [],
            "not_run": [],
        }
        print(f"# {len(utterances)} utterances, {results['audio_s']} s; lines {', '.join(args.lines)}; "
              f"nemotron: {results['nemotron_model']}; {results['device']}", flush=True)
        audio = {line: [phone_band(u.audio, line) for u in utterances] for line in args.lines}
        for name, make in plan(args, norm, Path(tmp)):
            try:
                backend = make()
            except (SetupError, ImportError) as e:
                results["not_run"].append({"backend": name, "reason": str(e)})
                print(f"{name}: not run: {e}", flush=True)
                continue
            try:
                backend.transcribe(audio[args.lines[0]][0])  # warm-up, not counted
                for line in args.lines:
                    row = summarize(backend, line, utterances, [backend.transcribe(a) for a in audio[line]], norm)
                    results["rows"].append(row)
                    print(row_line(row), flush=True)
            finally:
                backend.close()
                del backend
                gc.collect()
            save(results, args)
    return results


def device_label(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def save(results: dict, args) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.label}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, help="NeMo JSON-lines manifest (default: synthesize a small one)")
    parser.add_argument("--nemo", default=os.environ.get("STT_MODEL_PATH") or TINY,
                        help="the streaming model's .nemo (default: STT_MODEL_PATH, else 'tiny': a random test model)")
    parser.add_argument("--chunks", default=",".join(map(str, CHUNKS)), help="ASR_CHUNK_MS values")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--lines", default="clean,narrowband", help=f"line conditions: {', '.join(LINES)}")
    parser.add_argument("--whisper", type=Path, default=os.environ.get("WHISPER_MODEL_PATH") or None,
                        help="CTranslate2 Whisper directory (default: WHISPER_MODEL_PATH, else the bundled tiny.en)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--normalizer", default="basic", choices=NORMALIZERS)
    parser.add_argument("--limit", type=int, help="at most this many utterances")
    parser.add_argument("--realtime", action="store_true", help="hand the engine each chunk when its audio would arrive")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="asr_wer", help="output file names")
    args = parser.parse_args(argv)
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    args.backends = [b for b in args.backends.split(",") if b]
    args.lines = [line for line in args.lines.split(",") if line]
    for value, allowed, what in ((args.backends, BACKENDS, "--backends"), (args.lines, LINES, "--lines"), (args.chunks, CHUNKS, "--chunks")):
        wrong = [v for v in value if v not in allowed]
        if wrong or not value:
            parser.error(f"{what} {','.join(map(str, wrong))}: allowed values are {', '.join(map(str, allowed))}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    results = run(args)
    path = save(results, args)
    write_markdown(results, path.with_suffix(".md"))
    if results["rows"]:
        plot(results, path.with_suffix(".png"))
    print(f"wrote {path}, {path.with_suffix('.md').name}" + (f", {path.with_suffix('.png').name}" if results["rows"] else ""))
    print("\n".join(decision_lines(results)))
    return results


if __name__ == "__main__":
    import sys

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    main()

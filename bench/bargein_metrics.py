"""Turn one pass's recordings and frame times into the barge-in metrics.

Definitions (Full-Duplex-Bench v1.5 where it has one; segments from :mod:`bench.bargein_segments`):

- caller onset: start of the caller's Silero segment for speech events, the first loud 10 ms
  block for non-speech (coughs, noise), on the caller-only channel;
- stop latency: onset -> end of Annie's output segment under way at the onset (how long she kept
  talking over the caller); FD-Bench's overlap is the same number while the caller still talks;
- barge-in success: an interruption was committed and Annie's segment ended before the caller's;
- stale audio: Annie's output speech after she stopped and before the first audio of her reply to
  the interruption (seconds at the sink; on the simulated line also the count of played chunks);
- false barge-in: an interruption (or, with pause-first, a pause) that no caller sound explains:
  no caller utterance was under way (or had ended less than 1 s before), and it was not started
  by a final transcript that came within 6 s of the end of one (Whisper's finals are late);
  the echo-only exposure is Annie's speech outside those caller windows;
- voice-to-voice: end of the caller's question -> Annie audible, with its stages from the frames.
"""

from __future__ import annotations

from statistics import median

import numpy as np

from bench import bargein_segments as seg
from agent.demo.frames import FrameTimes
from bench.bargein_script import Event

LOUD_DBFS = -45.0
EXPLAIN_AFTER_S = 6.0  # Whisper's final transcript can come seconds after the caller stopped
DURING_AFTER_S = 1.0  # the VAD's stop delay and the sink's tail after a caller utterance


def in_caller_window(utterances, t: float, after_s: float = DURING_AFTER_S) -> bool:
    """Whether ``t`` falls from 0.3 s before a caller utterance (speech, backchannel or noise)
    to ``after_s`` after its end."""
    return any(s - 0.3 <= t <= e + after_s for s, e, *_ in utterances)
REPLY_WITHIN_S = 8.0  # an interruption not answered within this long was not heard (STT gave no words)


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def stats_ms(values: list[float]) -> dict:
    ms = [1000 * v for v in values]
    return {"n": len(ms), "median_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "max_ms": max(ms) if ms else None}


def vad_pipeline_lag(records: list[dict]) -> dict:
    """How much later the live pipeline's VAD started than the same VAD run offline on the audio it
    heard, per event with both (positive: the host held the audio or the analyzer back)."""
    lags = [(r["live_vad_ms"] - r["offline_vad_ms"]) / 1000 for r in records
            if r.get("live_vad_ms") is not None and r.get("offline_vad_ms") is not None]
    return stats_ms(lags) | {"over_100ms": sum(lag > 0.1 for lag in lags)}


def energy_onset(track: np.ndarray, t0: float, after: float, before: float) -> float | None:
    block = 160
    i0, i1 = max(0, int((after - t0) * seg.RATE)), min(len(track), int((before - t0) * seg.RATE))
    x = track[i0:i1].astype(np.float32) / 32768.0
    n = len(x) // block
    if n == 0:
        return None
    db = 10 * np.log10((x[: n * block].reshape(n, block) ** 2).mean(axis=1) + 1e-12)
    loud = np.nonzero(db > LOUD_DBFS)[0]
    return after + loud[0] * block / seg.RATE if loud.size else None


class PassAnalysis:
    def __init__(self, *, events: list[Event], utterances: list[tuple[float, float, str]], times: FrameTimes,
                 caller: np.ndarray, output: np.ndarray, t0: float, pauses: list[tuple[float, float | None]],
                 played: list[tuple[float, bytes]], echo_blocks: list[tuple[float, float]], pause_first: bool):
        self.events = events
        self.utterances = utterances
        self.times = times
        self.caller, self.output, self.t0 = caller, output, t0
        self.pauses = pauses
        self.played = played
        self.echo_blocks = echo_blocks
        self.pause_first = pause_first
        self.caller_segs = seg.speech_segments(caller, seg.CALLER_MERGE_S, t0)
        self.annie_segs = seg.speech_segments(output, seg.ANNIE_MERGE_S, t0)

    # -- per event --------------------------------------------------------------------------
    def onset(self, ev: Event) -> float:
        if ev.group in ("interruption", "backchannel", "question"):
            s = seg.first_after(self.caller_segs, ev.start - 0.1, ev.end)
            if s is not None:
                return s.start
        return energy_onset(self.caller, self.t0, ev.start - 0.05, ev.end) or ev.start

    def caller_end(self, ev: Event) -> float:
        s = seg.first_after(self.caller_segs, ev.start - 0.1, ev.end)
        return s.end if s is not None else ev.end

    def event_record(self, ev: Event) -> dict:
        heard_from = self.onset(ev)
        window_end = ev.end + 2.0
        # What the call did about this sound: from when it reached the line (nothing earlier answers it).
        since = min(heard_from - 0.05, ev.start)
        committed = self.times.first("interruption", since, window_end)
        paused = next((p for p, _ in self.pauses if since <= p < window_end), None)
        # The call's VAD (a lower start threshold, 10 ms steps) can hear the sound a little before
        # the bench's Silero (32 ms windows at 0.5) does; its pause then ended Annie's segment just
        # before that onset, and she would count as silent when cut in on. The first reaction
        # bounds the onset. (Her segment's end is known to one Silero window: the slack.)
        onset = min([heard_from] + [t for t in (paused, committed) if t is not None])
        rec = {"kind": ev.kind, "group": ev.group, "text": ev.text, "voice": ev.voice, "level_dbfs": ev.level_dbfs,
               "snr_db": ev.snr_db, "onset": onset - self.t0, "end": ev.end - self.t0, "warmup": ev.warmup}
        annie = seg.covering(self.annie_segs, onset, slack_s=seg.WINDOW / seg.RATE)
        rec["annie_speaking"] = bool(annie is not None and annie.start < onset - 0.05)
        rec["committed_ms"] = None if committed is None else 1000 * (committed - onset)
        rec["paused_ms"] = None if paused is None else 1000 * (paused - onset)
        rec["decisions"] = [d for d, _ in ev.decisions]
        rec["triggered"] = committed is not None or paused is not None
        if ev.group == "question":
            rec.update(self.voice_to_voice(ev))
            return rec
        if rec["annie_speaking"] and (ev.group == "interruption" or rec["triggered"]):
            rec["stop_latency_ms"] = 1000 * (annie.end - onset)
            rec["caller_segment_end"] = self.caller_end(ev) - self.t0
        if ev.group == "interruption":
            rec["success"] = bool(committed and rec["annie_speaking"] and annie.end < self.caller_end(ev))
            rec["wrongly_resumed"] = "resume" in rec["decisions"]
            rec.update(self.stale_after(annie.end if annie else onset, committed))
            reply = seg.first_after(self.annie_segs, self.caller_end(ev) + 0.05, self.caller_end(ev) + REPLY_WITHIN_S)
            rec["response_latency_ms"] = None if reply is None else 1000 * (reply.start - self.caller_end(ev))
            rec["heard"] = self.transcript(committed or onset, self.caller_end(ev) + 3.0)
        else:
            rec["heard"] = self.transcript(onset, ev.end + 3.0)
            rec["kept_talking"] = committed is None
            rec["resumed"] = "resume" in rec["decisions"] and committed is None
            if rec["resumed"]:
                rec.update(self.resume_continuity(paused))
        return rec

    def transcript(self, start: float, end: float) -> str:
        return " ".join(text.strip() for t, kind, text in self.times.transcripts if kind == "final" and start <= t < end)

    def stale_after(self, stopped: float, committed: float | None) -> dict:
        if committed is None:
            return {"stale_s": None, "stale_chunks": None}
        llm = self.times.first("llm_text", committed)
        reply_audio = self.times.first("tts_audio", llm) if llm is not None else None
        until = reply_audio if reply_audio is not None else committed + 5.0
        start = max(stopped, committed) + 0.1
        stale_s = seg.total_in(self.annie_segs, start, until)
        chunks = None
        if self.played:
            chunks = 0
            for t, pcm in self.played:
                if start <= t < until:
                    x = np.frombuffer(pcm, dtype=np.int16).astype(np.float32)
                    chunks += int(x.size > 0 and np.sqrt(np.mean(x**2)) > 300)
        return {"stale_s": stale_s, "stale_chunks": chunks}

    def resume_continuity(self, paused_at: float | None) -> dict:
        """Samples lost (>0) or repeated (<0) where playback resumed, against the TTS output."""
        if paused_at is None or not self.played:
            return {"resume_gap_samples": None}
        produced = self.times.produced()
        played = b"".join(pcm for _, pcm in self.played)
        cut = sum(len(pcm) for t, pcm in self.played if t < paused_at)
        snip = 2 * 1200  # 50 ms at 24 kHz
        before = _loud_window(played, cut, snip, backwards=True)
        after = _loud_window(played, cut, snip, backwards=False)
        if before is None or after is None:
            return {"resume_gap_samples": None}
        # Annie's stories repeat over a long call: look for the audio before the pause among what
        # had been synthesized by then, latest first, and for the audio after it from there on.
        synthesized = sum(len(a) for t, a, _ in self.times.tts_audio if t < paused_at)
        pb = _rfind_even(produced, played[before : before + snip], synthesized)
        pa = _find_even(produced, played[after : after + snip], max(0, pb))
        if pb < 0 or pa < 0:
            return {"resume_gap_samples": None}
        return {"resume_gap_samples": ((pa - pb) - (after - before)) // 2}

    # -- voice to voice ---------------------------------------------------------------------
    def voice_to_voice(self, ev: Event) -> dict:
        end = self.caller_end(ev)
        t = self.times
        vad = t.first("vad_stop", end - 0.3)
        final = t.first("final", vad or end)
        llm = t.first("llm_text", final or end)
        tts = t.first("tts_audio", llm or end)
        bot = t.first("bot_started", tts or end)
        audible = seg.first_after(self.annie_segs, end, end + REPLY_WITHIN_S)
        stages = {"vad_stop": (end, vad), "stt_final": (vad, final), "llm_first_token": (final, llm),
                  "tts_first_audio": (llm, tts), "playback_start": (tts, bot), "audible_at_sink": (bot, audible.start if audible else None)}
        out = {f"{k}_ms": (1000 * (b - a) if a is not None and b is not None else None) for k, (a, b) in stages.items()}
        out["voice_to_voice_ms"] = 1000 * (audible.start - end) if audible else None
        return out

    # -- echo only --------------------------------------------------------------------------
    def _during_caller(self, t: float) -> bool:
        return in_caller_window(self.utterances, t)

    def _late_transcript(self, t: float) -> bool:
        """A turn started by a final transcript of something the caller said a little earlier."""
        return any(abs(tf - t) < 0.1 and any(e <= tf <= e + EXPLAIN_AFTER_S for _, e, _ in self.utterances)
                   for tf, kind, _ in self.times.transcripts if kind == "final")

    def unexplained(self, kind_times: list[float], transcripts_explain: bool = True) -> list[float]:
        return [x for x in kind_times
                if not self._during_caller(x) and not (transcripts_explain and self._late_transcript(x))]

    def echo_only(self) -> dict:
        explained = [(s - 0.3, e + DURING_AFTER_S) for s, e, _ in self.utterances]
        exposure = 0.0
        for a in self.annie_segs:
            pieces = [(a.start, a.end)]
            for s, e in explained:
                pieces = [p for lo, hi in pieces for p in ((lo, min(hi, s)), (max(lo, e), hi)) if p[1] > p[0]]
            exposure += sum(hi - lo for lo, hi in pieces)
        # A barge-in stops Annie: count only those that came while she was audible at the ear.
        speaking = [t for t in self.times.by_kind.get("interruption", []) if seg.covering(self.annie_segs, t, 0.05)]
        false_commits = self.unexplained(speaking)
        false_pauses = self.unexplained([p for p, _ in self.pauses], transcripts_explain=False)
        # How long each of those silenced Annie (the hiccup a caller hears).
        lengths = [r - p for p, r in self.pauses if r is not None and p in set(false_pauses)]
        block_s = sum(e - s for s, e in self.echo_blocks)
        return {"annie_speech_without_caller_s": exposure, "echo_block_s": block_s,
                "false_barge_ins": len(false_commits), "false_pauses": len(false_pauses),
                "false_pause_ms": stats_ms(lengths),
                "false_barge_in_times": [x - self.t0 for x in false_commits],
                "false_barge_ins_per_min": len(false_commits) / (exposure / 60) if exposure > 0 else None}

    def no_speech_scores(self, scores: list[tuple[float, str, float]]) -> dict:
        """Whisper's ``no_speech_prob`` of each transcribed segment, split into the caller's
        (from a caller event's onset to 2 s after its end, as Whisper's final comes late: speech,
        backchannel or noise) and Annie's echo residue (all others), with how many each threshold
        would keep."""
        split: dict[str, list[dict]] = {"caller": [], "echo": []}
        for t, text, prob in scores:
            split["caller" if in_caller_window(self.utterances, t, after_s=2.0) else "echo"].append(
                {"t": round(t - self.t0, 3), "text": text, "no_speech_prob": round(prob, 3)})
        passed = {who: {str(th): sum(r["no_speech_prob"] < th for r in rows) for th in (0.4, 0.5, 0.6, 0.7, 0.8)}
                  for who, rows in split.items()}
        return {"segments": split, "counts": {k: len(v) for k, v in split.items()}, "kept_below_threshold": passed}

    def records(self) -> list[dict]:
        return [self.event_record(ev) for ev in self.events]


def _loud_window(pcm: bytes, at: int, size: int, *, backwards: bool) -> int | None:
    step = size
    pos = at - size if backwards else at
    pos -= pos % 2
    for _ in range(200):
        if pos < 0 or pos + size > len(pcm):
            return None
        x = np.frombuffer(pcm[pos : pos + size], dtype=np.int16)
        if np.count_nonzero(np.abs(x) > 200) > x.size // 2:
            return pos
        pos += -step if backwards else step
    return None


def _rfind_even(haystack: bytes, needle: bytes, end: int) -> int:
    pos = haystack.rfind(needle, 0, end)
    while pos > 0 and pos % 2:
        pos = haystack.rfind(needle, 0, pos + len(needle) - 1)
    return pos


def _find_even(haystack: bytes, needle: bytes, start: int = 0) -> int:
    pos = haystack.find(needle, start)
    while pos >= 0 and pos % 2:
        pos = haystack.find(needle, pos + 1)
    return pos


def gate_record(tap, records: list[dict], t0: float) -> dict:
    """The caller-voice gate's verdicts in one pass, each put to the event whose sound it scored
    (from 0.3 s before the event's onset to 1.5 s after its end; else ``echo``: nobody spoke, so it
    scored Annie's echo), with the counts per source."""
    if tap is None:
        return {"enrolled_s": 0.0, "verdicts": [], "by_source": {}}
    scored = []
    for t, v in zip(tap.verdict_times, tap.verdicts):
        at = t - t0
        ev = next((r for r in records if r["onset"] - 0.3 <= at <= r["end"] + 1.5), None)
        source = "echo" if ev is None else ev["kind"] if ev["group"] in ("noise", "burst") else ev["group"]
        scored.append({"t": round(at, 3), "source": source, "verdict": v.verdict.value,
                       "caller": None if v.caller is None else round(v.caller, 3),
                       "annie": None if v.annie is None else round(v.annie, 3)})
    by_source: dict[str, dict] = {}
    for r in scored:
        d = by_source.setdefault(r["source"], {"caller": 0, "not_caller": 0, "unsure": 0, "caller_scores": []})
        d[r["verdict"]] += 1
        if r["caller"] is not None:
            d["caller_scores"].append(r["caller"])
    for d in by_source.values():
        d["caller_score_median"] = float(np.median(d["caller_scores"])) if d["caller_scores"] else None
    return {"enrolled_s": round(tap.gate.caller_seconds, 2), "verdicts": scored, "by_source": by_source}


def summarize(records: list[dict], echo: dict) -> dict:
    by = lambda g: [r for r in records if r["group"] == g]  # noqa: E731
    inter = [r for r in by("interruption") if r["annie_speaking"]]
    stops = [r["stop_latency_ms"] / 1000 for r in inter if r.get("stop_latency_ms") is not None and r["success"]]
    out: dict = {
        "interruptions": len(inter),
        "barge_in_success": sum(r["success"] for r in inter),
        "stop_latency": stats_ms(stops),
        "detect_latency": stats_ms([min(x for x in (r["committed_ms"], r["paused_ms"]) if x is not None) / 1000
                                    for r in inter if r["triggered"]]),
        # The same VAD run offline on the recorded agent input (rig only): the signal's share.
        "offline_vad_latency": stats_ms([r["offline_vad_ms"] / 1000 for r in inter if r.get("offline_vad_ms") is not None]),
        "offline_vad_missed": sum(1 for r in inter if "offline_vad_ms" in r and r["offline_vad_ms"] is None),
        # The pipeline's share: its own VAD start after the offline one on the same audio (host load).
        "vad_pipeline_lag": vad_pipeline_lag(inter),
        "stale_chunks": sum(r["stale_chunks"] or 0 for r in inter),
        "stale_s": sum(r["stale_s"] or 0 for r in inter),
        "wrongly_resumed": sum(r["wrongly_resumed"] for r in inter),
        "response_latency": stats_ms([r["response_latency_ms"] / 1000 for r in inter if r.get("response_latency_ms")]),
        "interruptions_not_answered": sum(r.get("response_latency_ms") is None for r in inter),
        "echo_only": echo,
    }
    for group in ("backchannel", "burst", "noise"):
        rs = [r for r in by(group) if r["annie_speaking"]]
        gaps = [r["resume_gap_samples"] for r in rs if r.get("resume_gap_samples") is not None]
        out[group] = {"events": len(rs), "triggered": sum(r["triggered"] for r in rs),
                      "false_barge_ins": sum(not r["kept_talking"] for r in rs),
                      "resumed": sum(r["resumed"] for r in rs), "kept_talking": sum(r["kept_talking"] for r in rs),
                      "resume_gaps_samples": gaps}
    snr = {}
    for r in by("noise"):
        if r["annie_speaking"]:
            key = f"{r['kind']}@{r['snr_db']:g}"
            d = snr.setdefault(key, {"kind": r["kind"], "snr_db": r["snr_db"], "events": 0, "triggered": 0, "false_barge_ins": 0})
            d["events"] += 1
            d["triggered"] += r["triggered"]
            d["false_barge_ins"] += not r["kept_talking"]
    out["noise_by_snr"] = sorted(snr.values(), key=lambda d: (d["kind"], -d["snr_db"]))
    questions = [r for r in by("question") if not r["warmup"]]
    v2v = [r for r in questions if r.get("voice_to_voice_ms") is not None and r["voice_to_voice_ms"] <= 1000 * REPLY_WITHIN_S]
    out["questions_not_answered"] = len(questions) - len(v2v)
    out["voice_to_voice"] = stats_ms([r["voice_to_voice_ms"] / 1000 for r in v2v])
    stages = ("vad_stop", "stt_final", "llm_first_token", "tts_first_audio", "playback_start", "audible_at_sink")
    out["voice_to_voice_stages_median_ms"] = {
        s: median([r[f"{s}_ms"] for r in v2v if r.get(f"{s}_ms") is not None] or [float("nan")]) for s in stages}
    st = out["voice_to_voice_stages_median_ms"]
    ours = sum(v for k, v in st.items() if k in ("vad_stop", "stt_final", "playback_start", "audible_at_sink") and v == v)
    servers = sum(v for k, v in st.items() if k in ("llm_first_token", "tts_first_audio") and v == v)
    out["voice_to_voice_share"] = {"our_code_ms": ours, "servers_ms": servers,
                                   "our_share": ours / (ours + servers) if ours + servers else None}
    return out

"""What the echo canceller did on a phone-line pass: ERLE on echo only, and the caller's onset under double talk.

Both come from three tracks of one pass on the rig, on one monotonic timeline at 16 kHz: the raw
mic (caller, room and echo, before any canceller), what the agent heard (the cancelled mic) and
the caller alone (recorded before the mic, through the line's band and level).

- **ERLE**: over the echo-only blocks of the pass (Annie speaking, the caller silent), the raw
  mic's energy against the agent input's, in 100 ms blocks where the echo is present (the raw
  mic within 30 dB of its loudest); the pooled figure and the median block.
- **Caller onset loss**: for each caller sound that started while Annie spoke, the caller's level
  over its first 300 ms against the agent input's over the same 300 ms (the residual echo is in
  there too, so a canceller that leaves echo looks kinder than it is).
"""

from __future__ import annotations

import numpy as np

RATE = 16000
BLOCK_S = 0.1
ONSET_S = 0.3


def _energy(x: np.ndarray) -> float:
    return float(np.mean(x.astype(np.float64) ** 2)) if len(x) else 0.0


def _db(e: float) -> float:
    return 10 * np.log10(e + 1e-9)


def erle(raw: np.ndarray, heard: np.ndarray, windows: list[tuple[float, float]], t0: float) -> dict:
    """ERLE (dB) over the echo-only ``windows`` (monotonic times; tracks start at ``t0``)."""
    block = int(BLOCK_S * RATE)
    pairs = []
    for start, end in windows:
        a, b = int((start - t0) * RATE), int((end - t0) * RATE)
        for i in range(max(0, a), min(b, len(raw), len(heard)) - block + 1, block):
            pairs.append((_energy(raw[i : i + block]), _energy(heard[i : i + block])))
    if not pairs:
        return {"blocks": 0, "pooled_db": None, "median_db": None}
    energies = np.array(pairs)
    loud = energies[:, 0] > energies[:, 0].max() * 1e-3
    kept = energies[loud]
    return {"blocks": int(loud.sum()), "pooled_db": round(_db(kept[:, 0].sum()) - _db(kept[:, 1].sum()), 1),
            "median_db": round(float(np.median(_db(kept[:, 0]) - np.array([_db(e) for e in kept[:, 1]]))), 1),
            "raw_echo_dbfs": round(_db(kept[:, 0].mean()) - _db(32768.0**2), 1)}


def onset_loss(caller: np.ndarray, heard: np.ndarray, records: list[dict]) -> dict:
    """The caller's first 300 ms at the agent against the caller alone, for sounds over Annie's speech.

    ``records`` are the pass's event records (``onset`` in seconds from the tracks' start).
    """
    n = int(ONSET_S * RATE)
    losses = []
    for r in records:
        if r["group"] == "question" or not r["annie_speaking"]:
            continue
        i = int(r["onset"] * RATE)
        if i < 0 or i + n > min(len(caller), len(heard)):
            continue
        c = _energy(caller[i : i + n])
        if c <= 0:
            continue
        losses.append(_db(c) - _db(_energy(heard[i : i + n])))
    if not losses:
        return {"n": 0, "median_db": None, "p90_db": None}
    return {"n": len(losses), "median_db": round(float(np.median(losses)), 1),
            "p90_db": round(float(np.percentile(losses, 90)), 1)}


def line_metrics(line, t0: float, end: float, echo_windows: list[tuple[float, float]], records: list[dict]) -> dict:
    """ERLE and onset loss for one pass on a rig line (empty on a line without a raw mic)."""
    if not hasattr(line, "raw_mic"):
        return {}
    raw = line.raw_mic(t0, end)
    heard = line.agent_input(t0, end)
    caller, _ = line.channels(t0, end)
    return {"erle": erle(raw, heard, echo_windows, t0), "onset_loss": onset_loss(caller, heard, records)}

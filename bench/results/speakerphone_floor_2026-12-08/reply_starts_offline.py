# Run from the repo root: PYTHONPATH=. python bench/results/speakerphone_floor_2026-12-08/reply_starts_offline.py
"""Offline: does AEC3 let the start of a reply through after Annie was cut off, with the reference exact?"""
import numpy as np
from bench.bargein_onset_offline import annie_track, cancelled, RATE
from transports.rig.linemodel import preset
line = preset("speakerphone")
annie = annie_track(120)
for talk_s, gap_s in ((1.8, 1.2), (1.8, 3.0), (6.0, 1.0), (6.0, 8.0)):
    track = np.zeros_like(annie); starts = []; t = 8.0; pos = int(8.0 * RATE)
    track[:pos] = annie[:pos]  # 8 s to converge
    while t + talk_s + gap_s < 110:
        t += gap_s; a = int(t * RATE); n = int(talk_s * RATE)
        track[a:a + n] = annie[pos:pos + n]; pos += n; starts.append(t); t += talk_s
    out = cancelled(line, track, np.zeros_like(track), False)
    def lvl(x, a, b):
        seg = x[int(a * RATE):int(b * RATE)].astype(np.float64)
        return 20 * np.log10(np.sqrt(np.mean(seg ** 2)) / 32768 + 1e-9)
    start_lv = [lvl(out, s + 0.25, s + 0.6) for s in starts]
    mid_lv = [lvl(out, s + 1.0, s + 1.5) for s in starts]
    print(f"replies of {talk_s} s, {gap_s} s apart: cancelled input 0.25-0.6 s into a reply median {np.median(start_lv):.1f} dBFS "
          f"(above -45: {sum(v > -45 for v in start_lv)} of {len(starts)}); 1.0-1.5 s in median {np.median(mid_lv):.1f}")

"""Phone-band conditioning of 16 kHz speech for the ASR bench: what the Bluetooth hands-free
link leaves of the caller's voice, by the line model's own bands and filter
(``transports/rig/linemodel.py``: ``BAND_HZ``, ``BandFilter``; shared/DESIGN.md section 9).

- ``narrowband``: HFP's CVSD band: the line model's 300-3400 Hz band-pass, then down to 8 kHz and
  back up to 16 kHz (soxr), 16-bit.
- ``wideband``: HFP's mSBC band at 16 kHz: the line model's 80-7000 Hz band-pass, 16-bit.
- ``clean``: unchanged.

Band only: no codec artefacts (CVSD, mSBC, AMR), packet loss, echo or room (the line model's echo
and room belong to a call, not to a manifest's utterances).
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
LINES = ("clean", "narrowband", "wideband")


def phone_band(samples: np.ndarray, line: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` (float32 in [-1, 1], mono, ``sample_rate``) as heard through ``line``; same rate and length."""
    if line not in LINES:
        raise ValueError(f"unknown line {line!r}: allowed values are {', '.join(LINES)}")
    samples = np.asarray(samples, dtype=np.float32)
    if line == "clean" or samples.size == 0:
        return samples
    from transports.rig.linemodel import BAND_HZ, BandFilter

    out = BandFilter(BAND_HZ[line], sample_rate).process(samples.astype(np.float64))
    if line == "narrowband":
        import soxr

        out = soxr.resample(soxr.resample(out, sample_rate, 8000), 8000, sample_rate)
        out = np.pad(out, (0, max(0, samples.size - out.size)))[: samples.size]
    return (np.round(np.clip(out, -1.0, 1.0) * 32767) / 32767).astype(np.float32)


"""Does this line bring Annie's voice back at all? A slow detector for the AEC3 canceller.

AEC3 cannot learn that *nothing* comes back: on a line without echo (a phone whose own canceller
removes it all) it keeps suppressing the mic whenever Annie speaks, 9-31 dB off the caller's
double talk (measured offline with livekit 1.2.1; with an echo even 45 dB down it keeps the
caller within 2 dB). :class:`EchoPresence` looks at 2 s windows of the reference and the raw mic,
and in those where Annie spoke, for a cross-correlation peak (GCC-PHAT, lags 0-600 ms) that
stands out of the rest. After :data:`ABSENT_WINDOWS` such windows in a row without one, the line
has no echo (the canceller then passes the mic through); one window with a peak brings it back.

Pure numpy, called from the capture thread; a window costs two 16k-point FFTs at 8 kHz.
"""

from __future__ import annotations

import numpy as np

WINDOW_S = 2.0
MAX_LAG_S = 0.6
# Annie spoke in the window: the reference's RMS above this (int16 units, about -50 dBFS).
ACTIVE_RMS = 100.0
# A peak this many times the median of |GCC-PHAT| over the lags is an echo path.
PEAK_RATIO = 12.0
ABSENT_WINDOWS = 3


class EchoPresence:
    """Feed it the reference and the mic, block by block; :attr:`echo_free` says what it found."""

    def __init__(self, rate: int = 16000):
        self.rate = rate
        self._step = 2 if rate >= 16000 else 1  # analyse at 8 kHz
        self._window = int(WINDOW_S * rate)
        self._ref: list[np.ndarray] = []
        self._mic: list[np.ndarray] = []
        self._n = 0
        self.absent = 0  # windows in a row where Annie spoke and no echo was found
        self.echo_free = False
        self.last_ratio: float | None = None

    def add(self, ref: np.ndarray, mic: np.ndarray) -> bool | None:
        """Add one block of each; returns the window's verdict when one completes (True: echo)."""
        self._ref.append(ref)
        self._mic.append(mic)
        self._n += len(mic)
        if self._n < self._window:
            return None
        ref_w = np.concatenate(self._ref)[:: self._step].astype(np.float64)
        mic_w = np.concatenate(self._mic)[:: self._step].astype(np.float64)
        self._ref, self._mic, self._n = [], [], 0
        if np.sqrt(np.mean(ref_w**2)) < ACTIVE_RMS:
            return None  # Annie was silent: nothing to learn
        found = self._peak_ratio(ref_w, mic_w) >= PEAK_RATIO
        if found:
            self.absent, self.echo_free = 0, False
        else:
            self.absent += 1
            self.echo_free = self.absent >= ABSENT_WINDOWS
        return found

    def _peak_ratio(self, ref: np.ndarray, mic: np.ndarray) -> float:
        n = 1 << int(np.ceil(np.log2(len(ref) + len(mic))))
        cross = np.fft.rfft(mic, n) * np.conj(np.fft.rfft(ref, n))
        cross /= np.abs(cross) + 1e-9  # PHAT: whiten, so the echo's delay shows as a sharp peak
        corr = np.abs(np.fft.irfft(cross, n))[: int(MAX_LAG_S * self.rate / self._step)]
        self.last_ratio = float(corr.max() / (np.median(corr) + 1e-12))
        return self.last_ratio

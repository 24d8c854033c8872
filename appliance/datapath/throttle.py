"""A token-bucket throttle the operator can change while a sync runs.

The daemon keeps one per job and calls ``set_rate`` when the operator changes it; the copier
asks ``reserve(n)`` before each read and waits the returned time. Zero requests carry no
payload and are not throttled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

BURST_S = 0.25  # bucket depth in seconds of the rate: smooth on a WAN, no long bursts


class Throttle:
    def __init__(
        self, rate: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rate: int | None = None
        self._tokens = 0.0
        self._t = clock()
        self.set_rate(rate)

    @property
    def rate(self) -> int | None:
        """Bytes per second; None = unlimited."""
        return self._rate

    def set_rate(self, rate: int | None) -> None:
        with self._lock:
            self._rate = rate if rate and rate > 0 else None
            self._t = self._clock()
            self._tokens = min(self._tokens, self._burst())

    def _burst(self) -> float:
        return float(self._rate) * BURST_S if self._rate else 0.0

    def reserve(self, n: int) -> float:
        """Take n bytes if the bucket allows: returns 0.0. Otherwise take nothing and return
        the seconds to wait before asking again. A request larger than the bucket passes
        once the bucket is full (it then goes negative), so big requests never starve."""
        with self._lock:
            if self._rate is None:
                return 0.0
            now = self._clock()
            burst = self._burst()
            self._tokens = min(burst, self._tokens + (now - self._t) * self._rate)
            self._t = now
            if self._tokens >= min(n, burst):
                self._tokens -= n
                return 0.0
            return (min(n, burst) - self._tokens) / self._rate

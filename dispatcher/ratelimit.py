"""In-process rate limits of the ops API: exception ingest per token, failed authentications per
client address. Each dispatcher keeps its own (they must work while Redis is away); their memory is
bounded by the number of keys they keep (the least recently seen ones are forgotten first)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

MAX_KEYS = 10_000


def retry_after_header(seconds: float) -> str:
    """Whole seconds, at least 1: a client that retries at once would only be refused again."""
    return str(max(1, math.ceil(seconds)))


class TokenBuckets:
    """A token bucket per key. A request is let in while its bucket is above zero and may take it
    into debt (a spool's big batch is never starved); the debt is then paid back at `rate`."""

    def __init__(self, rate: float, burst: float, max_keys: int = MAX_KEYS) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._b: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str, n: float) -> float:
        """0 if let in (n taken); else the seconds until the key may send again."""
        now = time.monotonic()
        tokens, at = self._b.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens > 0:
            tokens -= n
        else:
            wait = max(-tokens / self.rate, 0.001)
        self._b[key] = (tokens, now)
        while len(self._b) > self.max_keys:
            self._b.popitem(last=False)
        return wait


class FailureWindow:
    """Failures per key in fixed windows: the count so far and the time left in the window."""

    def __init__(self, window_s: float = 60.0, max_keys: int = MAX_KEYS) -> None:
        self.window_s, self.max_keys = window_s, max_keys
        self._w: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key -> (window start, failures)

    def _current(self, key: str, now: float) -> tuple[float, int]:
        start, n = self._w.pop(key, (now, 0))
        return (now, 0) if now - start >= self.window_s else (start, n)

    def count(self, key: str) -> tuple[int, float]:
        now = time.monotonic()
        start, n = self._current(key, now)
        self._w[key] = (start, n)
        return n, start + self.window_s - now

    def fail(self, key: str) -> tuple[int, float]:
        now = time.monotonic()
        start, n = self._current(key, now)
        self._w[key] = (start, n + 1)
        while len(self._w) > self.max_keys:
            self._w.popitem(last=False)
        return n + 1, start + self.window_s - now

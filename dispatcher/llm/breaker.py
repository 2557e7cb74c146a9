"""A circuit breaker per provider: closed (used), open (skipped, no request waits on it) and
half-open (one background probe decides). Pure state, driven by a clock passed in, so it is
tested without sleeping."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]
# (old, new, reason)
Listener = Callable[[BreakerState, BreakerState, str], None]


class Breaker:
    def __init__(self, threshold: int = 3, rate: float = 0.5, window: int = 20, cooldown_ms: int = 2000,
                 cooldown_max_ms: int = 30_000, on_change: Listener | None = None) -> None:
        self.threshold, self.rate = threshold, rate
        self.cooldown_ms, self.cooldown_max_ms = cooldown_ms, cooldown_max_ms
        self.state: BreakerState = "closed"
        self.consecutive = 0
        self.outcomes: deque[bool] = deque(maxlen=window)  # True = failure
        self.opened_at = 0.0
        self.since = 0.0
        self._cooldown = cooldown_ms / 1000
        self.on_change = on_change

    def _set(self, new: BreakerState, now: float, reason: str) -> None:
        old, self.state, self.since = self.state, new, now
        if old != new and self.on_change is not None:
            self.on_change(old, new, reason)

    @property
    def error_rate(self) -> float:
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else 0.0

    def allows(self) -> bool:
        """Only a closed breaker takes user requests; a half-open one is probed in the background,
        so no user waits on a provider that has not yet proved it is back."""
        return self.state == "closed"

    def success(self, now: float) -> None:
        self.consecutive = 0
        self.outcomes.append(False)
        if self.state != "closed":
            self._cooldown = self.cooldown_ms / 1000
            # the window still holds the failures that opened it; a fresh start avoids reopening at once
            self.outcomes.clear()
            self._set("closed", now, "probe succeeded")

    def failure(self, now: float, reason: str) -> None:
        self.consecutive += 1
        self.outcomes.append(True)
        if self.state == "half_open":
            self._cooldown = min(self._cooldown * 2, self.cooldown_max_ms / 1000)
            self.opened_at = now
            self._set("open", now, f"probe failed: {reason}")
        elif self.state == "closed":
            if self.consecutive >= self.threshold:
                self.trip(now, f"{self.consecutive} failures in a row, last: {reason}")
            elif len(self.outcomes) == self.outcomes.maxlen and self.error_rate >= self.rate:
                self.trip(now, f"{self.error_rate:.0%} of the last {len(self.outcomes)} calls failed, last: {reason}")

    def trip(self, now: float, reason: str) -> None:
        """Open at once (e.g. failing health checks), whatever the counters say."""
        if self.state == "open":
            return
        self.opened_at = now
        self._set("open", now, reason)

    def probe_due(self, now: float) -> bool:
        return self.state == "open" and now - self.opened_at >= self._cooldown

    def start_probe(self, now: float) -> None:
        self._set("half_open", now, "cooldown over: probing")

    def reopen_in(self, now: float) -> float | None:
        return max(0.0, self.opened_at + self._cooldown - now) if self.state == "open" else None

"""What the pool knows about one provider: its breaker, recent latencies, 429 back-off, health
check results and staff controls, and the view of it the ops API serves."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque

from ctops.config import LLMProviderSpec, LLMSettings
from ctops.wire import LLMProviderState, LLMProviderView
from dispatcher.llm.breaker import Breaker, Listener

LATENCY_SAMPLES = 200
# below this many samples a provider's p99 says little, so stalls are judged by its timeout alone
MIN_SAMPLES_FOR_STALL = 5


# a provider's answer is checked before it is passed on (schema, size, encoding); a bad one fails
# that try, so the next provider is asked and the breaker counts it, like an error status
ANSWER_MAX_BYTES = 4 * 1024 * 1024
_SSE_START = (b"data:", b":", b"event:", b"id:", b"retry:")


def answer_problem(body: bytes) -> str | None:
    """Why a 2xx answer to a chat completion is not one, or None: it must be UTF-8 JSON with a
    non-empty `choices` list whose first item has a `message` with text (or null) content."""
    try:
        obj = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        return "the answer is not JSON in UTF-8"
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "the answer has no choices"
    message = choices[0].get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str | None):
        return "the answer's first choice has no message content"
    return None


def stream_problem(first: bytes) -> str | None:
    """Why the first chunk of a streamed answer does not start server-sent events, or None."""
    head = first.lstrip()
    return None if not head or head.startswith(_SSE_START) else "the stream is not server-sent events"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Provider:
    def __init__(self, spec: LLMProviderSpec, settings: LLMSettings, on_change: Listener | None = None) -> None:
        self.spec, self.name = spec, spec.name
        self.url = spec.base_url.rstrip("/")
        self.timeout = spec.timeout_ms / 1000
        self.settings = settings
        self.breaker = Breaker(settings.failure_threshold, settings.failure_rate, settings.failure_window,
                               settings.cooldown_ms, settings.cooldown_max_ms, on_change)
        # latency to a committed answer: full body (stream=False) or first chunk (stream=True) differ a lot
        self.latency: dict[bool, deque[float]] = {False: deque(maxlen=LATENCY_SAMPLES),
                                                  True: deque(maxlen=LATENCY_SAMPLES)}
        self.requests = self.failures = self.rate_limited = self.probes = 0
        self.inflight = 0
        self.stalled = 0  # tries in flight already judged stalled: new requests skip the provider meanwhile
        self.skip_until = 0.0  # monotonic; set by 429 Retry-After
        self.health_ok: bool | None = None
        self.health_latency_ms: float | None = None
        self.health_failures = 0
        self.last_error: str | None = None
        self.disabled_by: str | None = None
        self.pinned = False
        # set when the provider must no longer be waited on (breaker open, disabled); renewed when it is back
        self.gone = asyncio.Event()

    @property
    def headers(self) -> dict[str, str]:
        key = self.spec.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def usable(self, now: float) -> bool:
        return (self.disabled_by is None and self.breaker.allows() and now >= self.skip_until
                and self.stalled == 0)

    def stall_after(self, stream: bool) -> float:
        """Seconds after which an unanswered try is judged stalled; the timeout when unknown."""
        s = self.settings
        lat = self.latency[stream]
        if s.stall_factor <= 0 or len(lat) < MIN_SAMPLES_FOR_STALL:
            return self.timeout
        p99 = percentile(list(lat), 0.99) or 0.0
        return min(self.timeout, max(s.stall_min_ms / 1000, s.stall_factor * p99))

    def mark_gone(self) -> None:
        self.gone.set()

    def mark_back(self) -> None:
        if self.gone.is_set():
            self.gone = asyncio.Event()

    # --- outcomes ------------------------------------------------------------------------------
    def ok(self, seconds: float, stream: bool) -> None:
        self.latency[stream].append(seconds)
        self.breaker.success(time.monotonic())

    def failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        self.breaker.failure(time.monotonic(), reason)

    def throttled(self, retry_after_s: float) -> None:
        self.rate_limited += 1
        self.last_error = f"429, retry after {retry_after_s:g}s"
        self.skip_until = max(self.skip_until, time.monotonic() + retry_after_s)

    # --- view ----------------------------------------------------------------------------------
    def state(self, now: float) -> LLMProviderState:
        if self.disabled_by is not None:
            return "disabled"
        if self.breaker.state != "closed":
            return "down"
        if now < self.skip_until:
            return "rate_limited"
        if self.health_ok is False or self.stalled:
            return "degraded"
        return "up"

    def view(self) -> LLMProviderView:
        now = time.monotonic()
        lat = list(self.latency[False]) + list(self.latency[True])
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        reopen = self.breaker.reopen_in(now)
        return LLMProviderView(
            name=self.name, base_url=self.url, model=self.spec.model, priority=self.spec.priority,
            state=self.state(now), breaker=self.breaker.state, pinned=self.pinned,
            disabled=self.disabled_by is not None, disabled_by=self.disabled_by, requests=self.requests,
            failures=self.failures, rate_limited=self.rate_limited, inflight=self.inflight,
            error_rate=round(self.breaker.error_rate, 4),
            p50_ms=round(p50 * 1000, 2) if p50 is not None else None,
            p99_ms=round(p99 * 1000, 2) if p99 is not None else None,
            health_ok=self.health_ok, health_latency_ms=self.health_latency_ms,
            retry_after_ms=int((self.skip_until - now) * 1000) if now < self.skip_until else None,
            reopen_in_ms=int(reopen * 1000) if reopen is not None else None,
            last_error=self.last_error,
            since_ms=int((time.time() - (now - self.breaker.since)) * 1000) if self.breaker.since else None,
        )

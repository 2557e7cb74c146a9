"""Whether this server can reach the shared store, known ahead of time so health routes never wait on it.

Liveness (`/healthz`) answers from the process alone: an agent that restarts a server because Redis
is slow would turn one outage into two. Readiness (`/readyz`) reports the store as last probed here
in the background, so the dispatcher's check gets an answer at once even while Redis hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.exceptions import RedisError

from ctops import redisconn
from trainer.store import Store

log = logging.getLogger("trainer.readiness")

PROBE_INTERVAL_S = 0.25
PROBE_TIMEOUT_S = 0.5
# the store counts as unavailable once no probe succeeded for this long; longer than the dispatcher
# needs to notice the outage itself, so a shared outage is never mistaken for this server's own fault
STALE_AFTER_S = 1.5


class StoreProbe:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.active_sessions: int | None = None
        self.last_ok: float | None = None  # monotonic
        self.error: str | None = "not probed yet"
        self._task: asyncio.Task[None] | None = None

    @property
    def ok(self) -> bool:
        return self.last_ok is not None and time.monotonic() - self.last_ok < STALE_AFTER_S

    def silent_ms(self) -> int | None:
        return None if self.last_ok is None else int((time.monotonic() - self.last_ok) * 1000)

    async def probe_once(self) -> None:
        started = time.monotonic()
        try:
            n = await asyncio.wait_for(self.store.active_sessions(), PROBE_TIMEOUT_S)
        except (TimeoutError, RedisError, OSError) as exc:
            if self.error is None:
                log.warning("shared store not answering: %s: %s", type(exc).__name__, exc)
            self.error = f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
            return
        if self.error is not None and self.last_ok is not None:
            log.warning("shared store answering again")
        self.active_sessions, self.last_ok, self.error = n, started, None

    async def run(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def start(self) -> None:
        # one bounded probe first, so the first readiness answer is already informed
        await self.probe_once()
        self._task = asyncio.create_task(self.run(), name="store probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def readiness(self, server: str) -> tuple[int, dict]:
        # transactions no replica confirmed in time since this server started (the dispatchers add them up)
        body: dict = {"server": server, "active_sessions": self.active_sessions,
                      "writes_unconfirmed": redisconn.CONFIRM.unconfirmed}
        if self.ok:
            return 200, {**body, "status": "ok", "store": "ok"}
        return 503, {**body, "status": "store-unavailable", "store": "unavailable", "store_error": self.error,
                     "store_silent_ms": self.silent_ms()}

"""Active health checks: GET /readyz on every server at a fixed interval, with fall/rise counts.

The check asks for readiness, not liveness: a server that cannot reach the shared store while this
dispatcher can has a problem of its own and leaves rotation. When the store is away for everyone
(this dispatcher cannot reach it either), "store unavailable" answers count as passing: the servers
are alive, requests that need no store are still served and the others get a clear 503 from the
server, where taking every server out would fail them all.

A check opens a fresh connection each time on purpose: a server that stopped accepting, or that
the kernel still accepts for while the process is frozen, must fail the check, and a pooled
connection would hide the first case.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ctops.clock import now_ms
from dispatcher.pool import Backend, ServerPool

log = logging.getLogger("ctops.dispatcher.health")
CHECK_PATH = "/readyz"
STORE_UNAVAILABLE = "store-unavailable"


@dataclass(slots=True)
class CheckResult:
    ok: bool
    error: str | None = None
    active_sessions: int | None = None
    # the server answered, and said it cannot reach the shared store: alive (so the data plane's
    # probe of a slow request does not evacuate it), and in rotation unless the store is only its problem
    store_unavailable: bool = False
    writes_unconfirmed: int | None = None  # the server's count of writes no replica confirmed in time


async def check_once(b: Backend, timeout: float) -> CheckResult:
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(b.host, b.port)
            writer.write(f"GET {CHECK_PATH} HTTP/1.1\r\nHost: {b.host}:{b.port}\r\nConnection: close\r\n"
                         "User-Agent: ctops-health\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, _, header_blob = head.partition(b"\r\n")
            parts = status_line.split(b" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            length = 0
            for line in header_blob.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and value.strip().isdigit():
                    length = int(value.strip())
            body = await reader.readexactly(length) if 0 < length <= 65536 else b""
    except TimeoutError:
        return CheckResult(False, f"health check timed out after {int(timeout * 1000)} ms")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        return CheckResult(False, f"health check failed: {type(exc).__name__}: {exc}".strip())
    finally:
        if writer is not None:
            writer.close()
    doc: object = None
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        pass
    sessions = unconfirmed = None
    if isinstance(doc, dict):
        sessions = doc["active_sessions"] if isinstance(doc.get("active_sessions"), int) else None
        unconfirmed = doc["writes_unconfirmed"] if isinstance(doc.get("writes_unconfirmed"), int) else None
    if status != 200:
        if status == 503 and isinstance(doc, dict) and doc.get("status") == STORE_UNAVAILABLE:
            why = str(doc.get("store_error") or "no answer")[:200]
            return CheckResult(True, f"server cannot reach the shared store: {why}", sessions, True, unconfirmed)
        return CheckResult(False, f"health check answered HTTP {status}")
    return CheckResult(True, None, sessions, False, unconfirmed)


def apply_result(pool: ServerPool, b: Backend, r: CheckResult, fall: int, rise: int) -> None:
    """Fall/rise state machine: up -> suspect -> down after `fall` failures; down -> up after `rise`."""
    first = b.last_check_ms is None
    b.last_check_ms = now_ms()
    if r.active_sessions is not None:
        b.active_sessions = r.active_sessions
    if r.ok:
        b.consecutive_fail = 0
        b.consecutive_ok += 1
        # the first check after start decides at once: a fresh dispatcher should not wait `rise`
        if b.health == "suspect" or (b.health == "down" and (first or b.consecutive_ok >= rise)):
            pool.set_health(b, "up", "health check passed")
        return
    b.consecutive_ok = 0
    b.consecutive_fail += 1
    b.last_error = r.error
    if b.health != "down":
        down = first or b.consecutive_fail >= fall
        pool.set_health(b, "down" if down else "suspect", r.error or "")


class HealthChecker:
    def __init__(self, pool: ServerPool, interval: float, timeout: float, fall: int, rise: int,
                 on_round: Callable[[], None] | None = None,
                 store_reachable: Callable[[], bool] | None = None) -> None:
        self.pool, self.interval, self.timeout = pool, interval, timeout
        self.fall, self.rise = fall, rise
        self.on_round = on_round
        # whether this dispatcher itself reaches the store (steadily): see the module doc
        self.store_reachable = store_reachable or (lambda: True)
        self.store_blind: set[str] = set()  # servers whose last check said the store is away
        self.unconfirmed: dict[str, int] = {}  # per server, as its last readiness answer counted them
        self.rounds = 0  # progress, for the loop watch

    async def _check(self, b: Backend) -> None:
        r = await check_once(b, self.timeout)
        if r.writes_unconfirmed is not None:
            self.unconfirmed[b.name] = r.writes_unconfirmed
        if r.store_unavailable:
            self.store_blind.add(b.name)
            if self.store_reachable():
                r = CheckResult(False, r.error, r.active_sessions, True)  # the store is only this server's problem
            else:
                r = CheckResult(True, None, r.active_sessions, True)  # a shared outage: the server itself is fine
        else:
            self.store_blind.discard(b.name)
        apply_result(self.pool, b, r, self.fall, self.rise)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            # every server is checked concurrently so one hung server does not delay the others
            await asyncio.gather(*(self._check(b) for b in self.pool), return_exceptions=True)
            self.rounds += 1
            if self.on_round:
                self.on_round()
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

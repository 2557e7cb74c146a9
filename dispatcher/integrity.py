"""The leader's side of record integrity (`ctops.integrity`): it turns what trainers set aside into
staff events, and walks the whole state in the background to find damage nobody has read yet.

Trainers hold no dispatcher credentials, so they log damage to a Redis stream; the leader relays
each entry as one `record_corrupt` event naming the key, the kind and the learner's session. The
event and the relay cursor are written in one fenced transaction, so an entry becomes exactly one
event across leader changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from ctops import integrity, logs, redisconn
from ctops.config import RedisSettings
from ctops.envelope import Corrupt
from ctops.keys import Keys
from dispatcher.events import EventLog
from dispatcher.lease import Lease, NotLeader
from dispatcher.store import admin_state_damaged

log = logging.getLogger("ctops.dispatcher.integrity")

RELAY_INTERVAL_S = 1.0
RELAY_BATCH = 100
# a full pass, then a pause ([timings] scrub_interval_ms, scrub_rate); the rate keeps a pass far
# below what learners' requests cost Redis and the host's CPU: 2,000 keys/s is ~8 minutes for a
# million records, and ~6 % of a core
SCRUB_PAUSE_S = 600.0
SCRUB_RATE = 2000.0
# records per SCAN and pipelined read. Each round trip costs the scrub ~0.3 ms of CPU (asyncio and
# redis-py), so small batches cost the machine: 74 µs a record in batches of 10, 39 in batches of
# 50 (hiredis); a batch of 50 still holds Redis for a fraction of a millisecond before a learner's
# command is served
SCRUB_BATCH = 50


def _s(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def event_message(f: dict[str, str]) -> str:
    who = f"session {f['session']}" if f.get("session") else "no session known"
    return (f"damaged {f.get('kind', '?')} record {f.get('key', '?')} ({who}): {f.get('reason', '?')}"
            f"{' - ' + f['detail'] if f.get('detail') else ''}; found by {f.get('reader', '?')}, "
            f"{f.get('outcome', 'set aside')}; quarantine {f.get('qid', '?')}")


async def integrity_summary(redis: Redis, keys: Keys) -> dict[str, Any]:
    """`corrupt_found`, `repaired`, `last_scrub_ms`, for the store status (`ctops status --json`)."""
    return await integrity.summary(redis, keys)


ADMIN_KIND = "admin-state"


async def repair_admin_state(redis: Redis, keys: Keys, name: str, backend: object, reader: str) -> None:
    """A server's damaged staff state: set aside and rewritten with the state this dispatcher
    applies now (it was intact when read), so routing and the stored state agree again."""
    key = keys.server(name)
    current = getattr(backend, "admin", "enabled")

    async def check(c: object) -> None:
        try:
            v = await c.hget(key, "admin")  # type: ignore[attr-defined]
        except ResponseError as exc:
            raise Corrupt(key, "type", str(exc)) from None
        if admin_state_damaged(v):
            raise Corrupt(key, "schema", "the admin field is not a staff state")

    def replace(p: Pipeline, _qid: str) -> None:
        p.hset(key, "admin", current)

    try:
        done = await integrity.contain(redis, keys, key, ADMIN_KIND, check, reader=f"dispatcher:{reader}",
                                       replace=replace, repaired=True)
    except (RedisError, OSError) as exc:
        log.warning("cannot set the damaged staff state of %s aside: %s", name, exc)
        return
    if done is not None:
        log.error("staff state of %s was damaged (%s): set aside as %s, rewritten as %r", name, done.reason,
                  done.qid, current)


class IntegrityWatch:
    """The relay on the dispatcher's event loop (a few commands a second); the scrub in a process
    of its own (`ScrubProcess`), so that a pass over a million records never runs in the event loop
    the proxy serves learners from, nor holds the interpreter lock the proxy needs."""

    def __init__(self, redis: Redis, keys: Keys, lease: Lease, events: EventLog, name: str,
                 scrub_rate: float = SCRUB_RATE, scrub_pause_s: float = SCRUB_PAUSE_S,
                 scrub_store: RedisSettings | None = None) -> None:
        self.r, self.k, self.lease, self.events, self.name = redis, keys, lease, events, name
        self.scrub = ScrubProcess(scrub_store, name, scrub_rate, scrub_pause_s) if scrub_store else None

    async def relay_once(self) -> int:
        """New quarantine log entries -> `record_corrupt` events; how many were relayed."""
        if not self.lease.still_valid():
            return 0
        cursor = _s(await self.r.get(self.k.quarantine_cursor) or "0-0")
        entries = integrity.range_reply(await self.r.xrange(self.k.quarantine_log, min=f"({cursor}", count=RELAY_BATCH))
        for entry_id, raw in entries:
            f = {_s(k): _s(v) for k, v in raw.items()}
            cmd = self.events.emit_command("record_corrupt", "critical", event_message(f), f"dispatcher:{self.name}",
                                           f.get("key"))
            await self.lease.fenced([cmd, ["SET", self.k.quarantine_cursor, _s(entry_id)]])
            log.warning("record_corrupt: %s", event_message(f))
        return len(entries)

    async def run(self) -> None:
        if self.scrub:
            self.scrub.start()
        try:
            await self._every(RELAY_INTERVAL_S, self._tick)
        finally:
            if self.scrub:
                self.scrub.stop()

    async def _tick(self) -> int:
        if self.scrub:
            self.scrub.set_leading(self.lease.still_valid())
        return await self.relay_once()

    async def _every(self, interval: float, fn: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await fn()
            except NotLeader:
                pass
            except (RedisError, OSError) as exc:
                log.warning("integrity relay: Redis failed: %s", exc)
            await asyncio.sleep(interval)


class ScrubProcess:
    """The leader's background scrub: a full pass at `rate` keys/s, then a pause, in a child
    process with its own Redis connection at the host's lowest CPU priority, SCRUB_BATCH keys at
    a time. It scrubs only while the
    dispatcher says it leads (a shared flag, refreshed every second) and exits when the dispatcher
    is gone. Results go where a pass always put them (`quarantine:stats`, read by `ctops status`
    and the Store tab); damage it sets aside is relayed as events like a read's."""

    def __init__(self, store: RedisSettings, name: str, rate: float, pause_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process running an event loop
        self._leading = ctx.Value("b", 0, lock=False)
        self._proc = ctx.Process(target=_scrub_main, name=f"scrub-{name}", daemon=True,
                                 args=(store, name, rate, pause_s, self._leading, os.getpid()))

    def start(self) -> None:
        self._proc.start()

    def set_leading(self, leading: bool) -> None:
        self._leading.value = int(leading)

    def stop(self, timeout: float = 2.0) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout)


def background_priority() -> str:
    """Make this process yield the CPU to every other one on the host; what it got, in words.
    SCHED_IDLE: a learner's request waking up in the proxy, a trainer or Redis takes the core from
    the scrub at once, instead of waiting out the scrub's time slice (the milliseconds a plain
    process keeps the core it holds are what showed in learners' p99 on a 2-core host). The
    price: on a host that is busy all the time a pass takes longer (`store.last_scrub_ms`)."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    try:
        os.nice(19 - os.nice(0))
    except OSError:
        return "normal"
    return "nice 19"


def _scrub_main(store: RedisSettings, name: str, rate: float, pause_s: float, leading: Any,
                parent: int) -> None:
    logs.setup(f"dispatcher[{name}] scrub")
    log.info("scrub: CPU priority %s", background_priority())
    asyncio.run(_scrub_loop(store, name, rate, pause_s, lambda: bool(leading.value), parent))


async def _scrub_loop(store: RedisSettings, name: str, rate: float, pause_s: float,
                      leading: Callable[[], bool], parent: int) -> None:
    passes = asyncio.create_task(_passes(store, name, rate, pause_s, leading))
    # a dispatcher killed outright leaves no scrub behind, even in the middle of a pass
    while os.getppid() == parent:
        done, _ = await asyncio.wait({passes}, timeout=0.5)
        if done:
            break
    passes.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await passes


async def _passes(store: RedisSettings, name: str, rate: float, pause_s: float, leading: Callable[[], bool]) -> None:
    r = redisconn.async_client(store, "dispatcher")
    keys = Keys(store.prefix)
    try:
        while True:
            await asyncio.sleep(pause_s)
            if not leading():
                continue
            log.info("scrub: pass started at %g keys/s", rate)
            try:
                report = await integrity.scrub(r, keys, repair=True, reader=f"scrub:{name}", rate=rate,
                                               batch=SCRUB_BATCH)
                await integrity.record_scrub(r, keys, report)
            except (RedisError, OSError) as exc:
                log.warning("scrub: Redis failed: %s", exc)
                continue
            log.info("scrub: %d records checked in %d ms, %d repaired, %d quarantined", report.checked,
                     report.elapsed_ms, report.repaired, report.quarantined)
    finally:
        await r.aclose()

"""The leader's side of record integrity (`ctops.integrity`): it turns what trainers set aside into
staff events, and walks the whole state in the background to find damage nobody has read yet.

Trainers hold no dispatcher credentials, so they log damage to a Redis stream; the leader relays
each entry as one `record_corrupt` event naming the key, the kind and the learner's session. The
event and the relay cursor are written in one fenced transaction, so an entry becomes exactly one
event across leader changes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from ctops import integrity
from ctops.envelope import Corrupt
from ctops.keys import Keys
from dispatcher.events import EventLog
from dispatcher.lease import Lease, NotLeader
from dispatcher.store import admin_state_damaged

log = logging.getLogger("ctops.dispatcher.integrity")

RELAY_INTERVAL_S = 1.0
RELAY_BATCH = 100
# a full pass, then a pause ([timings] scrub_interval_ms, scrub_rate); the rate keeps a pass far
# below what learners' requests cost Redis
SCRUB_PAUSE_S = 600.0
SCRUB_RATE = 5000.0
# records per SCAN and pipelined read: the scrub runs on a thread of its own, but it shares the GIL
# with the data plane, so one batch's checking (~10 µs a record) must stay far under a millisecond;
# Redis, too, serves a learner only after the batch's reads
SCRUB_BATCH = 10


def _s(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def event_message(f: dict[str, str]) -> str:
    who = f"session {f['session']}" if f.get("session") else "no session known"
    return (f"damaged {f.get('kind', '?')} record {f.get('key', '?')} ({who}): {f.get('reason', '?')}"
            f"{' - ' + f['detail'] if f.get('detail') else ''}; found by {f.get('reader', '?')}, "
            f"{f.get('outcome', 'set aside')}; quarantine {f.get('qid', '?')}")


async def integrity_summary(redis: Redis, keys: Keys) -> dict[str, int | None]:
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
    """The relay on the dispatcher's event loop (a few commands a second); the scrub on a thread of
    its own (`ScrubThread`), so that a pass over a million records never runs in the event loop the
    proxy serves learners from."""

    def __init__(self, redis: Redis, keys: Keys, lease: Lease, events: EventLog, name: str,
                 scrub_rate: float = SCRUB_RATE, scrub_pause_s: float = SCRUB_PAUSE_S,
                 scrub_client: Callable[[], Redis] | None = None) -> None:
        self.r, self.k, self.lease, self.events, self.name = redis, keys, lease, events, name
        self.scrub = ScrubThread(scrub_client, keys, lease.still_valid, name, scrub_rate, scrub_pause_s) \
            if scrub_client else None

    async def relay_once(self) -> int:
        """New quarantine log entries -> `record_corrupt` events; how many were relayed."""
        if not self.lease.still_valid():
            return 0
        cursor = _s(await self.r.get(self.k.quarantine_cursor) or "0-0")
        entries = await self.r.xrange(self.k.quarantine_log, min=f"({cursor}", count=RELAY_BATCH)
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
            await self._every(RELAY_INTERVAL_S, self.relay_once)
        finally:
            if self.scrub:
                self.scrub.stop()

    async def _every(self, interval: float, fn: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await fn()
            except NotLeader:
                pass
            except (RedisError, OSError) as exc:
                log.warning("integrity relay: Redis failed: %s", exc)
            await asyncio.sleep(interval)


class ScrubThread:
    """The leader's background scrub: a full pass at `rate` records/s, then a pause, on a daemon
    thread with its own event loop and its own Redis client (a client belongs to one loop), in
    batches of SCRUB_BATCH. Results go where a pass always put them (`quarantine:stats`, read by
    `ctops status` and the Store tab); damage it sets aside is relayed as events like a read's."""

    def __init__(self, client: Callable[[], Redis], keys: Keys, leading: Callable[[], bool], name: str,
                 rate: float, pause_s: float) -> None:
        self.client, self.k, self.leading, self.name = client, keys, leading, name
        self.rate, self.pause_s = rate, pause_s
        self.last: integrity.ScrubReport | None = None
        self.passes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, name=f"scrub-{name}", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(5)

    def stop(self, timeout: float = 5.0) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(self._run())
            self._ready.set()
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    async def _run(self) -> None:
        r = self.client()
        try:
            while True:
                await asyncio.sleep(self.pause_s)
                if not self.leading():
                    continue
                await self.pass_once(r)
        finally:
            await r.aclose()

    async def pass_once(self, r: Redis) -> integrity.ScrubReport | None:
        log.info("scrub: pass started at %g records/s", self.rate)
        try:
            report = await integrity.scrub(r, self.k, repair=True, reader=f"scrub:{self.name}", rate=self.rate,
                                           batch=SCRUB_BATCH)
            await integrity.record_scrub(r, self.k, report)
        except (RedisError, OSError) as exc:
            log.warning("scrub: Redis failed: %s", exc)
            return None
        self.last, self.passes = report, self.passes + 1
        log.info("scrub: %d records checked in %d ms, %d repaired, %d quarantined", report.checked,
                 report.elapsed_ms, report.repaired, report.quarantined)
        return report

"""Delivers the event stream to configured webhooks as JSON: in order, each event once, a burst
of the same event about the same target grouped into one message, retried with backoff.

Each webhook has a cursor in Redis (the last stream id it acknowledged with a 2xx), so a new
leader resumes where the old one stopped. Every message carries a `delivery_id` built from the
ids it covers, for a receiver that wants to drop the rare repeat after a leader dies mid-send.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ctops.config import WebhookSpec
from ctops.integrity import EVENT, checked_entries, range_reply
from ctops.keys import Keys
from ctops.wire import Event
from dispatcher.events import SEVERITY_RANK, to_event
from dispatcher.lease import NotLeader

log = logging.getLogger("ctops.dispatcher.webhooks")
BATCH = 500


def group(events: list[Event]) -> list[dict]:
    """One message per (kind, target) in order of first appearance, with a count."""
    groups: dict[tuple[str, str | None], dict] = {}
    for e in events:
        g = groups.get((e.kind, e.target))
        if g is None:
            groups[(e.kind, e.target)] = {
                "kind": e.kind, "target": e.target, "severity": e.severity, "source": e.source,
                "message": e.message, "count": 1, "first_ts_ms": e.ts_ms, "last_ts_ms": e.ts_ms, "ids": [e.id]}
        else:
            g["count"] += 1
            g["last_ts_ms"] = e.ts_ms
            g["message"] = e.message
            g["ids"].append(e.id)
            if SEVERITY_RANK[e.severity] > SEVERITY_RANK[g["severity"]]:
                g["severity"] = e.severity
    return list(groups.values())


class WebhookDeliverer:
    def __init__(self, redis: Redis, keys: Keys, spec: WebhookSpec, cluster: str,
                 is_leader: Callable[[], bool], fenced: Callable[[list], Awaitable[None]]) -> None:
        self.r, self.k, self.spec, self.cluster = redis, keys, spec, cluster
        self.is_leader = is_leader
        self.fenced = fenced  # the cursor moves only while this dispatcher still leads
        self.client = httpx.AsyncClient(timeout=spec.timeout_ms / 1000, headers=spec.headers)
        self.delivered = 0
        self.failures = 0

    async def _cursor(self) -> str:
        # a bytes client: redis-py types its replies for both kinds of client
        cur = cast("bytes | None", await self.r.get(self.k.webhook_cursor(self.spec.name)))
        if cur:
            return cur.decode()
        # a new webhook starts from now, not from the start of history
        last = range_reply(await self.r.xrevrange(self.k.events, count=1))
        start = last[0][0] if last else "0-0"
        await self.r.set(self.k.webhook_cursor(self.spec.name), start, nx=True)
        return cast("bytes", await self.r.get(self.k.webhook_cursor(self.spec.name))).decode()

    async def _post(self, messages: list[dict], ids: list[str]) -> bool:
        body = {"cluster": self.cluster, "webhook": self.spec.name,
                "delivery_id": hashlib.sha256("|".join(ids).encode()).hexdigest()[:32], "events": messages}
        try:
            r = await self.client.post(self.spec.url, json=body)
        except httpx.HTTPError as exc:
            log.warning("webhook %s: %s", self.spec.name, exc)
            return False
        if 200 <= r.status_code < 300:
            return True
        log.warning("webhook %s answered %s", self.spec.name, r.status_code)
        return False

    async def run_once(self) -> bool:
        """Deliver what is pending; True if anything was sent."""
        cursor = await self._cursor()
        entries = range_reply(await self.r.xrange(self.k.events, min=f"({cursor}", count=BATCH))
        if not entries:
            return False
        if self.spec.group_window_ms:
            # let a burst finish so it goes out as one message
            await asyncio.sleep(self.spec.group_window_ms / 1000)
            entries = range_reply(await self.r.xrange(self.k.events, min=f"({cursor}", count=BATCH))
        # a damaged event is set aside and not sent; the cursor still moves past it
        events = [to_event(i, f) for i, f in await checked_entries(self.r, self.k, self.k.events, EVENT, entries,
                                                                     reader=f"webhook:{self.spec.name}")]
        last_id = entries[-1][0]
        floor = SEVERITY_RANK[self.spec.min_severity]
        wanted = [e for e in events if SEVERITY_RANK[e.severity] >= floor]
        backoff = 0.5
        while wanted:
            if not self.is_leader():
                return False  # the new leader continues from the cursor
            if await self._post(group(wanted), [e.id for e in wanted]):
                self.delivered += len(wanted)
                break
            self.failures += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
        await self.fenced([["SET", self.k.webhook_cursor(self.spec.name), last_id]])
        return True

    async def run(self) -> None:
        # the cursor is fixed when the first dispatcher starts with this webhook configured, not
        # when one first leads: events between the two must not be skipped
        while True:
            try:
                await self._cursor()
                break
            except (RedisError, OSError) as exc:
                log.warning("webhook %s: Redis: %s", self.spec.name, exc)
                await asyncio.sleep(1)
        while True:
            try:
                if self.is_leader() and await self.run_once():
                    continue
            except (RedisError, OSError, NotLeader) as exc:
                log.warning("webhook %s: %s", self.spec.name, exc)
            except Exception:  # noqa: BLE001 - a delivery loop must outlive any one bad batch
                log.exception("webhook %s: delivery failed", self.spec.name)
            await asyncio.sleep(0.25)

    async def aclose(self) -> None:
        await self.client.aclose()

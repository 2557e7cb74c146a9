"""The cluster's event stream in Redis: server down/up, host lost/back, restarts, crash loops,
leader changes. Events from agents carry their own id and are stored once however often they
are sent; events the leader derives are written only while it holds the lease.

Each entry is sealed like an audit entry (`ctops.integrity.seal_entry`): a damaged one is set
aside, counted and left out of what staff read, never a 500; entries written before sealing are
served as they are."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from ctops.integrity import EVENT, read_entries, read_range, seal_entry
from ctops.keys import Keys
from ctops.redisconn import redis_fields
from ctops.wire import AgentEvent, Event, Severity

STREAM_MAXLEN = 100_000
SEEN_TTL_S = 7 * 24 * 3600
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def to_event(entry_id: object, fields: Mapping[Any, Any]) -> Event:
    f = {_s(k): _s(v) for k, v in fields.items()}
    return Event(id=_s(entry_id), event_id=f.get("event_id", ""), ts_ms=int(f.get("ts_ms", 0)),
                 kind=f.get("kind", "?"), severity=f.get("severity", "info"),
                 source=f.get("source", "?"), target=f.get("target") or None, message=f.get("message", ""))


class EventLog:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.r, self.k = redis, keys

    async def emit(self, kind: str, severity: Severity, message: str, source: str, target: str | None = None,
                   event_id: str | None = None, ts_ms: int | None = None) -> bool:
        """Append one event; False when an event with this id was stored before."""
        event_id = event_id or uuid.uuid4().hex
        if not await self.r.set(self.k.event_seen(event_id), 1, nx=True, ex=SEEN_TTL_S):
            return False
        await self.r.xadd(self.k.events, redis_fields(self._sealed(
            event_id, ts_ms or int(time.time() * 1000), kind, severity, source, target, message)),
            maxlen=STREAM_MAXLEN, approximate=True)
        return True

    def _sealed(self, event_id: str, ts_ms: int, kind: str, severity: str, source: str, target: str | None,
                message: str) -> dict[str, str | bytes]:
        return seal_entry(self.k.events, EVENT, {"event_id": event_id, "ts_ms": ts_ms, "kind": kind,
                                                 "severity": severity, "source": source, "target": target or "",
                                                 "message": message})

    def emit_command(self, kind: str, severity: Severity, message: str, source: str,
                     target: str | None = None) -> list[str | int | float]:
        """The XADD for an event the leader derives, to run inside a fenced write."""
        fields = self._sealed(uuid.uuid4().hex, int(time.time() * 1000), kind, severity, source, target, message)
        return ["XADD", self.k.events, "MAXLEN", "~", STREAM_MAXLEN, "*",
                *(str(x) for kv in fields.items() for x in kv)]

    async def ingest_agent_events(self, host: str, events: list[AgentEvent]) -> int:
        stored = 0
        for e in events:
            if await self.emit(e.kind, e.severity, e.message, f"agent:{host}", e.process or host,
                               event_id=f"{host}:{e.id}", ts_ms=e.ts_ms):
                stored += 1
        return stored

    async def read(self, after: str | None, limit: int, reader: str = "dispatcher") -> list[Event]:
        """Checked: a damaged entry is set aside and left out (one fewer than `limit` then)."""
        if after:
            entries = await read_range(self.r, self.k, self.k.events, EVENT, after, limit, reader=reader)
        else:
            entries = list(reversed(await read_entries(self.r, self.k, self.k.events, EVENT, limit, reader=reader)))
        return [to_event(i, f) for i, f in entries]

"""The cluster's event stream in Redis: server down/up, host lost/back, restarts, crash loops,
leader changes. Events from agents carry their own id and are stored once however often they
are sent; events the leader derives are written only while it holds the lease."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from ctops.integrity import range_reply
from ctops.keys import Keys
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
        await self.r.xadd(self.k.events, {
            "event_id": event_id, "ts_ms": ts_ms or int(time.time() * 1000), "kind": kind, "severity": severity,
            "source": source, "target": target or "", "message": message,
        }, maxlen=STREAM_MAXLEN, approximate=True)
        return True

    def emit_command(self, kind: str, severity: Severity, message: str, source: str,
                     target: str | None = None) -> list[str | int | float]:
        """The XADD for an event the leader derives, to run inside a fenced write."""
        return ["XADD", self.k.events, "MAXLEN", "~", STREAM_MAXLEN, "*", "event_id", uuid.uuid4().hex,
                "ts_ms", int(time.time() * 1000), "kind", kind, "severity", severity, "source", source,
                "target", target or "", "message", message]

    async def ingest_agent_events(self, host: str, events: list[AgentEvent]) -> int:
        stored = 0
        for e in events:
            if await self.emit(e.kind, e.severity, e.message, f"agent:{host}", e.process or host,
                               event_id=f"{host}:{e.id}", ts_ms=e.ts_ms):
                stored += 1
        return stored

    async def read(self, after: str | None, limit: int) -> list[Event]:
        if after:
            entries = range_reply(await self.r.xrange(self.k.events, min=f"({after}", count=limit))
        else:
            entries = list(reversed(range_reply(await self.r.xrevrange(self.k.events, count=limit))))
        return [to_event(i, f) for i, f in entries]

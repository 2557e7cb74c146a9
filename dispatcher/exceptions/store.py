"""Exception groups and occurrences in Redis.

One Lua call per event does dedupe (SET NX with a TTL), the group update, the regression check and
the append to the capped stream atomically: two dispatchers ingesting at once can never both see a
resolved group "regress", and a retried batch never counts an event twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from ctops.capture.fingerprint import culprit, fingerprint
from ctops.capture.wire import (
    ExceptionEvent,
    ExceptionStats,
    GroupView,
    Occurrence,
    SenderCounters,
)

STREAM_MAXLEN = 100_000
SEEN_TTL_S = 7 * 24 * 3600
RECENT_MAX = 20
SCAN_MAX = 5000  # groups looked at per list request

_INGEST = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[10]) then return {0, 0, ''} end
local g = KEYS[2]
local ts = tonumber(ARGV[2])
local status = redis.call('HGET', g, 'status')
local regressed = 0
if not status then
  redis.call('HSET', g, 'id', ARGV[1], 'type', ARGV[5], 'culprit', ARGV[7], 'first_ms', ARGV[2],
             'status', 'unresolved', 'last_ms', '0')
elseif status == 'resolved' then
  if ts > tonumber(redis.call('HGET', g, 'resolved_ms') or '0') then
    redis.call('HSET', g, 'status', 'regressed')
    regressed = 1
  end
elseif status == 'muted' then
  if tonumber(ARGV[9]) >= tonumber(redis.call('HGET', g, 'mute_until_ms') or '0') then
    redis.call('HSET', g, 'status', 'unresolved')
    redis.call('HDEL', g, 'mute_until_ms')
  end
end
local count = redis.call('HINCRBY', g, 'count', 1)
if ts >= tonumber(redis.call('HGET', g, 'last_ms') or '0') then
  redis.call('HSET', g, 'last_ms', ARGV[2], 'message', ARGV[6], 'last_event', ARGV[8])
  redis.call('ZADD', KEYS[6], ts, ARGV[1])
end
if ts < tonumber(redis.call('HGET', g, 'first_ms') or ARGV[2]) then redis.call('HSET', g, 'first_ms', ARGV[2]) end
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('LPUSH', KEYS[5], ARGV[8])
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[12]) - 1)
redis.call('ZADD', KEYS[7], count, ARGV[1])
local sid = redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[11], '*', 'g', ARGV[1], 'e', ARGV[8])
return {1, regressed, sid}
"""

# counters are cumulative per sender: keep the highest value seen (batches may arrive out of order)
_COUNTERS = """
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True, slots=True)
class ExcKeys:
    prefix: str

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}:exc:seen:{event_id}"

    def group(self, gid: str) -> str:
        return f"{self.prefix}:exc:group:{gid}"

    def hosts(self, gid: str) -> str:
        return f"{self.prefix}:exc:group:{gid}:hosts"

    def services(self, gid: str) -> str:
        return f"{self.prefix}:exc:group:{gid}:services"

    def recent(self, gid: str) -> str:
        return f"{self.prefix}:exc:group:{gid}:recent"

    @property
    def by_last(self) -> str:
        return f"{self.prefix}:exc:groups:last"

    @property
    def by_count(self) -> str:
        return f"{self.prefix}:exc:groups:count"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:exc:stream"

    @property
    def senders(self) -> str:
        return f"{self.prefix}:exc:senders"


@dataclass(slots=True)
class Ingested:
    accepted: int
    duplicates: int
    regressed: list[tuple[str, str, ExceptionEvent]]  # (group id, stream id, event)


class ExceptionStore:
    def __init__(self, redis: Redis, prefix: str, stream_maxlen: int = STREAM_MAXLEN) -> None:
        self.r = redis
        self.k = ExcKeys(prefix)
        self.stream_maxlen = stream_maxlen
        self._ingest = redis.register_script(_INGEST)
        self._counters = redis.register_script(_COUNTERS)

    async def ingest(self, events: list[ExceptionEvent], counters: SenderCounters | None = None) -> Ingested:
        now = int(time.time() * 1000)
        pipe = self.r.pipeline(transaction=False)
        gids = []
        for e in events:
            frames = [f.model_dump() for f in e.frames]
            gid = fingerprint(e.type, frames, e.message, e.logger if not e.frames else None)
            gids.append(gid)
            k = self.k
            await self._ingest(
                keys=[k.seen(e.event_id), k.group(gid), k.hosts(gid), k.services(gid), k.recent(gid), k.by_last,
                      k.by_count, k.stream],
                args=[gid, e.ts_ms, e.host, e.service, e.type, e.message[:500], culprit(frames),
                      e.model_dump_json(), now, SEEN_TTL_S, self.stream_maxlen, RECENT_MAX],
                client=pipe)
        if counters is not None:
            s = counters.sender
            await self._counters(keys=[self.k.senders], args=[f"{s}|dropped", counters.dropped, f"{s}|corrupt",
                                                              counters.corrupt, f"{s}|rejected", counters.rejected],
                                 client=pipe)
        results = await pipe.execute()
        accepted = dup = 0
        regressed = []
        for e, gid, res in zip(events, gids, results, strict=False):
            new, reg, sid = int(res[0]), int(res[1]), _s(res[2])
            if new:
                accepted += 1
            else:
                dup += 1
            if reg:
                regressed.append((gid, sid, e))
        return Ingested(accepted, dup, regressed)

    # --- reading -------------------------------------------------------------------------------
    async def groups(self, sort: str = "last") -> list[GroupView]:
        index = self.k.by_count if sort == "count" else self.k.by_last
        gids = [_s(g) for g in await self.r.zrevrange(index, 0, SCAN_MAX - 1)]
        return await self._views(gids)

    async def group(self, gid: str) -> GroupView | None:
        views = await self._views([gid])
        return views[0] if views else None

    async def _views(self, gids: list[str]) -> list[GroupView]:
        if not gids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for gid in gids:
            pipe.hgetall(self.k.group(gid))
            pipe.smembers(self.k.hosts(gid))
            pipe.smembers(self.k.services(gid))
        raw = await pipe.execute()
        now = int(time.time() * 1000)
        out = []
        for i, gid in enumerate(gids):
            h = {_s(k): _s(v) for k, v in raw[3 * i].items()}
            if not h:
                continue
            out.append(_view(gid, h, sorted(_s(x) for x in raw[3 * i + 1]), sorted(_s(x) for x in raw[3 * i + 2]),
                             now))
        return out

    async def latest(self, gid: str) -> ExceptionEvent | None:
        raw = await self.r.hget(self.k.group(gid), "last_event")
        return ExceptionEvent.model_validate_json(raw) if raw else None

    async def recent(self, gid: str, limit: int = RECENT_MAX) -> list[ExceptionEvent]:
        raw = await self.r.lrange(self.k.recent(gid), 0, limit - 1)
        return [ExceptionEvent.model_validate_json(x) for x in raw]

    async def tail(self, after: str | None, limit: int) -> tuple[list[Occurrence], str | None]:
        if after:
            entries = await self.r.xrange(self.k.stream, min=f"({after}", count=limit)
        else:
            entries = list(reversed(await self.r.xrevrange(self.k.stream, count=limit)))
        items = [Occurrence(id=_s(i), group_id=_s(f[b"g"]), event=ExceptionEvent.model_validate_json(f[b"e"]))
                 for i, f in entries]
        cursor = items[-1].id if items else after
        if cursor is None:
            last = await self.r.xrevrange(self.k.stream, count=1)
            cursor = _s(last[0][0]) if last else None
        return items, cursor

    async def stats(self) -> ExceptionStats:
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(self.k.by_last)
        pipe.xlen(self.k.stream)
        pipe.hgetall(self.k.senders)
        n_groups, n_events, senders = await pipe.execute()
        totals = {"dropped": 0, "corrupt": 0, "rejected": 0}
        losing: set[str] = set()
        for field, value in senders.items():
            sender, _, name = _s(field).rpartition("|")
            if name in totals and int(value) > 0:
                totals[name] += int(value)
                losing.add(sender)
        return ExceptionStats(groups=int(n_groups), events=int(n_events), senders_losing=sorted(losing), **totals)

    # --- actions -------------------------------------------------------------------------------
    async def set_status(self, gid: str, action: str, *, minutes: int | None = None,
                         assignee: str | None = None) -> GroupView | None:
        key = self.k.group(gid)
        if not await self.r.exists(key):
            return None
        now = int(time.time() * 1000)
        pipe = self.r.pipeline(transaction=True)
        if action == "acknowledge":
            pipe.hset(key, mapping={"status": "acknowledged"})
            pipe.hdel(key, "mute_until_ms")
        elif action == "resolve":
            pipe.hset(key, mapping={"status": "resolved", "resolved_ms": now})
            pipe.hdel(key, "mute_until_ms")
        elif action == "unresolve":
            pipe.hset(key, mapping={"status": "unresolved"})
            pipe.hdel(key, "mute_until_ms")
        elif action == "mute":
            pipe.hset(key, mapping={"status": "muted", "mute_until_ms": now + (minutes or 60) * 60_000})
        elif action == "assign":
            if assignee:
                pipe.hset(key, "assignee", assignee)
            else:
                pipe.hdel(key, "assignee")
        await pipe.execute()
        return await self.group(gid)


def _view(gid: str, h: dict[str, str], hosts: list[str], services: list[str], now: int) -> GroupView:
    status = h.get("status", "unresolved")
    mute_until = int(h["mute_until_ms"]) if h.get("mute_until_ms") else None
    if status == "muted" and mute_until is not None and mute_until <= now:
        status = "unresolved"  # the mute ran out; the next event also writes this down
        mute_until = None
    last_event_id = None
    if h.get("last_event"):
        try:
            last_event_id = json.loads(h["last_event"]).get("event_id")
        except ValueError:
            last_event_id = None
    return GroupView(id=gid, type=h.get("type", "?"), message=h.get("message", ""), culprit=h.get("culprit", ""),
                     count=int(h.get("count", 0)), first_seen_ms=int(h.get("first_ms", 0)),
                     last_seen_ms=int(h.get("last_ms", 0)), hosts=hosts, services=services,
                     status=status,  # type: ignore[arg-type]
                     assignee=h.get("assignee") or None, mute_until_ms=mute_until, last_event_id=last_event_id)

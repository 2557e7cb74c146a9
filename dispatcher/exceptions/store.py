"""Exception groups and occurrences in Redis.

One Lua call per event does dedupe (SET NX with a TTL), the group update, the regression check and
the append to the capped stream atomically: two dispatchers ingesting at once can never both see a
resolved group "regress", and a retried batch never counts an event twice.

A group's hash is sealed (`ctops.envelope`, the SHA-1 form scripts can compute): the ingest script
checks it before changing it and seals it again after, unless it found it damaged, which it leaves
for the readers here to set aside (`ctops.integrity.contain_group`). A damaged group is never a 500:
it is set aside, rebuilt from its indexes, and the rest of the list is served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ctops import integrity
from ctops.capture.fingerprint import culprit, fingerprint
from ctops.capture.wire import (
    ExceptionEvent,
    ExceptionStats,
    GroupView,
    Occurrence,
    SenderCounters,
)
from ctops.envelope import LUA_HASH_ENVELOPE, Corrupt, unseal_fields
from ctops.integrity import EXC_GROUP
from ctops.keys import Keys

log = logging.getLogger("ctops.dispatcher.exceptions")

STREAM_MAXLEN = 10_000
# an event id is remembered this long, so a batch resent (a spool replayed) within it is not counted
# twice; together with the ingest rate limit this bounds the memory the ids take
SEEN_TTL_S = 24 * 3600
MAX_GROUPS = 2_000
GROUP_TTL_S = 30 * 86_400
PRUNE_PER_CALL = 100
RECENT_MAX = 10
# an event is stored in at most this many bytes (larger ones are trimmed, see `stored_json`), so the
# memory the store can take is bounded: about (max_groups x RECENT_MAX + stream_maxlen) x this
STORED_EVENT_MAX = 16 * 1024
TRIMMED_FRAMES = 20
SCAN_MAX = 5000  # groups looked at per list request

# one call per group per batch; the seen keys are built from ARGV[8] and other groups' keys (to
# forget them) from ARGV[11] (fine outside Redis Cluster). Every key written has a TTL, the number of
# groups is capped (the oldest resolved group goes first, then the oldest), and so is the stream.
_INGEST = LUA_HASH_ENVELOPE + """
local g, hosts_k, services_k, recent_k, last_k, count_k, stream_k, resolved_k = unpack(KEYS)
local gid, now, ttl, maxlen, recent_max, seen = ARGV[1], tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local max_groups, gttl, gprefix, prune = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])
local function forget(other)
  local k = gprefix .. other
  redis.call('DEL', k, k .. ':hosts', k .. ':services', k .. ':recent')
  redis.call('ZREM', last_k, other)
  redis.call('ZREM', count_k, other)
  redis.call('ZREM', resolved_k, other)
end
local function oldest(index)
  for _, other in ipairs(redis.call('ZRANGE', index, 0, 1)) do
    if other ~= gid then return other end
  end
  return nil
end
local sealed, gen = env_check(g, 'exc-group')
local status = redis.call('HGET', g, 'status')
local resolved_ms = tonumber(redis.call('HGET', g, 'resolved_ms') or '0')
local last_ts = tonumber(redis.call('HGET', g, 'last_ms') or '-1')
local first_ts = tonumber(redis.call('HGET', g, 'first_ms') or '-1')
local first_s, last_s, last_msg = nil, nil, nil
local out = {0}
local added = 0
for i = 13, #ARGV, 6 do
  local eid, ts_s, host, svc, msg, ev = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local ts = tonumber(ts_s)
  if redis.call('SET', seen .. eid, '1', 'NX', 'EX', ttl) then
    if not status then
      redis.call('HSET', g, 'id', gid, 'type', ARGV[2], 'culprit', ARGV[3], 'status', 'unresolved')
      status = 'unresolved'
    elseif status == 'resolved' and ts > resolved_ms then
      status = 'regressed'
      redis.call('HSET', g, 'status', 'regressed')
      out[1] = (i - 13) / 6 + 1
    elseif status == 'muted' and now >= tonumber(redis.call('HGET', g, 'mute_until_ms') or '0') then
      status = 'unresolved'
      redis.call('HSET', g, 'status', 'unresolved')
      redis.call('HDEL', g, 'mute_until_ms')
    end
    added = added + 1
    if ts >= last_ts then last_ts, last_s, last_msg = ts, ts_s, msg end
    if first_ts < 0 or ts < first_ts then first_ts, first_s = ts, ts_s end
    redis.call('SADD', hosts_k, host)
    redis.call('SADD', services_k, svc)
    redis.call('LPUSH', recent_k, ev)
    out[#out + 1] = redis.call('XADD', stream_k, 'MAXLEN', '~', maxlen, '*', 'g', gid, 'e', ev)
  else
    out[#out + 1] = ''
  end
end
if added > 0 then
  local count = redis.call('HINCRBY', g, 'count', added)
  if first_s then redis.call('HSET', g, 'first_ms', first_s) end
  if last_s then
    redis.call('HSET', g, 'last_ms', last_s, 'message', last_msg)
    redis.call('ZADD', last_k, last_s, gid)
  end
  redis.call('LTRIM', recent_k, 0, recent_max - 1)
  redis.call('ZADD', count_k, count, gid)
  if status == 'resolved' then
    if last_s then redis.call('ZADD', resolved_k, last_s, gid) end
  else
    redis.call('ZREM', resolved_k, gid)
  end
  for _, k in ipairs({g, hosts_k, services_k, recent_k}) do redis.call('EXPIRE', k, gttl) end
  -- groups not seen for the TTL: their hashes have expired; drop them from the indexes too
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', last_k, '-inf', now - gttl * 1000, 'LIMIT', 0, prune)) do
    if other ~= gid then forget(other) end
  end
  local n = redis.call('ZCARD', last_k)
  while n > max_groups do
    local victim = oldest(resolved_k) or oldest(last_k)
    if not victim then break end
    forget(victim)
    n = n - 1
  end
  redis.call('XTRIM', stream_k, 'MINID', '~', tostring(now - gttl * 1000))
  for _, k in ipairs({last_k, count_k, resolved_k, stream_k}) do redis.call('EXPIRE', k, gttl) end
  -- a damaged group stays unsealed, so the next read sets it aside instead of this laundering it
  if sealed ~= 'damaged' then env_seal(g, 'exc-group', gen + 1) end
end
return out
"""

# a staff action on a group: checked first, changed, sealed again; ARGV = n, n name/value pairs to
# set, then names to delete. 'missing', 'damaged' (nothing changed) or 'intact'/'legacy'
_MUTATE = LUA_HASH_ENVELOPE + """
local g = KEYS[1]
local state, gen = env_check(g, 'exc-group')
if state == 'missing' or state == 'damaged' then return state end
local n = tonumber(ARGV[1])
for i = 2, 1 + 2 * n, 2 do redis.call('HSET', g, ARGV[i], ARGV[i + 1]) end
for i = 2 + 2 * n, #ARGV do redis.call('HDEL', g, ARGV[i]) end
env_seal(g, 'exc-group', gen + 1)
return state
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

    @property
    def shared(self) -> Keys:
        return Keys(self.prefix)

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}:exc:seen:{event_id}"

    def group(self, gid: str) -> str:
        return self.shared.exc_group(gid)

    def hosts(self, gid: str) -> str:
        return f"{self.prefix}:exc:group:{gid}:hosts"

    def services(self, gid: str) -> str:
        return f"{self.prefix}:exc:group:{gid}:services"

    def recent(self, gid: str) -> str:
        return f"{self.prefix}:exc:group:{gid}:recent"

    @property
    def by_last(self) -> str:
        return self.shared.exc_groups_index("last")

    @property
    def by_count(self) -> str:
        return self.shared.exc_groups_index("count")

    @property
    def resolved(self) -> str:
        return self.shared.exc_groups_index("resolved")

    @property
    def stream(self) -> str:
        return f"{self.prefix}:exc:stream"

    @property
    def senders(self) -> str:
        return self.shared.exc_senders


@dataclass(slots=True)
class Ingested:
    accepted: int
    duplicates: int
    regressed: list[tuple[str, str, ExceptionEvent]]  # (group id, stream id, event)


class ExceptionStore:
    def __init__(self, redis: Redis, prefix: str, stream_maxlen: int = STREAM_MAXLEN, max_groups: int = MAX_GROUPS,
                 ttl_s: int = GROUP_TTL_S, reader: str = "dispatcher") -> None:
        self.r = redis
        self.k = ExcKeys(prefix)
        self.stream_maxlen, self.max_groups, self.ttl_s = stream_maxlen, max_groups, ttl_s
        self.reader = reader  # who read a damaged group, for the quarantine
        self.ingested_total = 0  # new events this process stored since it started (GET /metrics)
        self._ingest = redis.register_script(_INGEST)
        self._counters = redis.register_script(_COUNTERS)
        self._mutate = redis.register_script(_MUTATE)

    async def _set_aside(self, gid: str) -> None:
        done = await integrity.contain_group(self.r, self.k.shared, gid, self.reader)
        if done is not None:
            log.error("exception group %s was damaged (%s): set aside as %s, %s", gid, done.reason, done.qid,
                      "rebuilt from its indexes" if done.repaired else "dropped")

    async def ingest(self, events: list[ExceptionEvent], counters: SenderCounters | None = None) -> Ingested:
        now = int(time.time() * 1000)
        by_group: dict[str, list[ExceptionEvent]] = {}
        culprits: dict[str, tuple[str, str]] = {}
        for e in events:
            # plain dicts of what grouping reads: cheaper than dumping the whole frame models
            frames = [{"module": f.module, "function": f.function, "in_app": f.in_app, "filename": f.filename}
                      for f in e.frames]
            gid = fingerprint(e.type, frames, e.message, e.logger if not e.frames else None)
            by_group.setdefault(gid, []).append(e)
            culprits.setdefault(gid, (e.type, culprit(frames)))
        pipe = self.r.pipeline(transaction=False)
        for gid, evs in by_group.items():
            await self._ingest_call(gid, culprits[gid], evs, now, pipe)
        if counters is not None:
            s = counters.sender
            await self._counters(keys=[self.k.senders], args=[f"{s}|dropped", counters.dropped, f"{s}|corrupt",
                                                              counters.corrupt, f"{s}|rejected", counters.rejected],
                                 client=pipe)
        results = await pipe.execute(raise_on_error=False)
        for i, gid in enumerate(by_group):
            if isinstance(results[i], ResponseError):
                # the group's keys hold damage the script trips over (another type, a number that
                # is not one): set it aside, then ingest its events again, once
                await self._set_aside(gid)
                results[i] = await self._ingest_call(gid, culprits[gid], by_group[gid], now, self.r)
        for res in results:
            if isinstance(res, Exception):
                raise res
        accepted = dup = 0
        regressed = []
        for (gid, evs), res in zip(by_group.items(), results, strict=False):
            sids = [_s(x) for x in res[1:]]
            new = sum(1 for x in sids if x)
            accepted += new
            dup += len(evs) - new
            if int(res[0]):
                i = int(res[0]) - 1
                regressed.append((gid, sids[i], evs[i]))
        self.ingested_total += accepted
        return Ingested(accepted, dup, regressed)

    async def _ingest_call(self, gid: str, type_culprit: tuple[str, str], evs: list[ExceptionEvent], now: int,
                           client: Any) -> Any:
        k = self.k
        args: list[str | int] = [gid, type_culprit[0], type_culprit[1], now, SEEN_TTL_S, self.stream_maxlen,
                                 RECENT_MAX, k.seen(""), self.max_groups, self.ttl_s, k.group(""), PRUNE_PER_CALL]
        for e in evs:
            args += [e.event_id, e.ts_ms, e.host, e.service, e.message[:500], stored_json(e)]
        return await self._ingest(keys=[k.group(gid), k.hosts(gid), k.services(gid), k.recent(gid), k.by_last,
                                        k.by_count, k.stream, k.resolved], args=args, client=client)

    # --- reading -------------------------------------------------------------------------------
    async def groups(self, sort: str = "last") -> list[GroupView]:
        index = self.k.by_count if sort == "count" else self.k.by_last
        gids = [_s(g) for g in await self.r.zrevrange(index, 0, SCAN_MAX - 1)]
        return await self._views(gids)

    async def group(self, gid: str) -> GroupView | None:
        views = await self._views([gid])
        return views[0] if views else None

    async def _views(self, gids: list[str], again: bool = True) -> list[GroupView]:
        if not gids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for gid in gids:
            pipe.hgetall(self.k.group(gid))
            pipe.smembers(self.k.hosts(gid))
            pipe.smembers(self.k.services(gid))
        raw = await pipe.execute(raise_on_error=False)
        now = int(time.time() * 1000)
        out: dict[str, GroupView] = {}
        damaged, legacy = [], []
        for i, gid in enumerate(gids):
            key = self.k.group(gid)
            try:
                if isinstance(raw[3 * i], ResponseError):
                    raise integrity.wrong_type(key, raw[3 * i])
                got = unseal_fields(key, raw[3 * i], EXC_GROUP)
                if got is None:
                    continue
                integrity.check_group(key, got[0])
            except Corrupt as exc:
                log.error("exception group %s is damaged: %s", gid, exc)
                damaged.append(gid)
                continue
            if got[2]:
                legacy.append(gid)
            out[gid] = _view(gid, got[0], _members(raw[3 * i + 1]), _members(raw[3 * i + 2]), now)
        for gid in damaged:
            await self._set_aside(gid)
        for gid in legacy:  # written before envelopes: sealed now, unless it changed meanwhile
            await self._mutate(keys=[self.k.group(gid)], args=[0])
        if damaged and again:
            out.update({v.id: v for v in await self._views(damaged, again=False)})
        return [out[g] for g in gids if g in out]

    async def recent(self, gid: str, limit: int = RECENT_MAX) -> list[ExceptionEvent]:
        raw = await self.r.lrange(self.k.recent(gid), 0, limit - 1)
        return [e for x in raw if (e := _event(x, gid)) is not None]

    async def tail(self, after: str | None, limit: int) -> tuple[list[Occurrence], str | None]:
        if after:
            entries = integrity.range_reply(await self.r.xrange(self.k.stream, min=f"({after}", count=limit))
        else:
            entries = list(reversed(integrity.range_reply(await self.r.xrevrange(self.k.stream, count=limit))))
        items = [Occurrence(id=_s(i), group_id=_s(f[b"g"]), event=e) for i, f in entries
                 if b"g" in f and (e := _event(f.get(b"e", b""), _s(i))) is not None]
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
        if not await self.r.exists(self.k.group(gid)):
            return None  # before touching the indexes: an unknown id must leave no trace there
        for _ in range(2):
            done = _s(await self._apply(gid, action, minutes, assignee))
            if done != "damaged":
                break
            await self._set_aside(gid)  # then the action is applied to the rebuilt group
        return None if done == "missing" else await self.group(gid)

    async def _apply(self, gid: str, action: str, minutes: int | None, assignee: str | None) -> Any:
        key = self.k.group(gid)
        now = int(time.time() * 1000)
        last_ms = int(await self.r.zscore(self.k.by_last, gid) or 0)
        sets: dict[str, str | int] = {}
        dels: list[str] = []
        pipe = self.r.pipeline(transaction=True)
        if action in ("acknowledge", "unresolve", "mute"):
            pipe.zrem(self.k.resolved, gid)
        if action == "acknowledge":
            sets, dels = {"status": "acknowledged"}, ["mute_until_ms"]
        elif action == "resolve":
            sets, dels = {"status": "resolved", "resolved_ms": now}, ["mute_until_ms"]
            # resolved groups are the first to go when the cap on groups is reached
            pipe.zadd(self.k.resolved, {gid: last_ms})
        elif action == "unresolve":
            sets, dels = {"status": "unresolved"}, ["mute_until_ms"]
        elif action == "mute":
            sets = {"status": "muted", "mute_until_ms": now + (minutes or 60) * 60_000}
        elif action == "assign":
            if assignee:
                sets = {"assignee": assignee}
            else:
                dels = ["assignee"]
        args: list[str | int] = [len(sets)]
        for name, value in sets.items():
            args += [name, value]
        try:
            await self._mutate(keys=[key], args=[*args, *dels], client=pipe)
            return (await pipe.execute())[-1]
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                return "damaged"
            raise


def _members(v: object) -> list[str]:
    """A set's members as text; a set of another type or undecodable bytes must not fail a listing."""
    if not isinstance(v, set | list):
        return []
    return sorted(x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in v)


def _event(raw: bytes | str, where: str) -> ExceptionEvent | None:
    """A stored event, or None (logged) when it no longer parses: one damaged event must not hide the rest."""
    try:
        return ExceptionEvent.model_validate_json(raw)
    except (ValidationError, ValueError) as exc:
        log.error("a stored exception event (%s) is damaged and skipped: %s", where, str(exc)[:200])
        return None


def stored_json(e: ExceptionEvent) -> str:
    """The event as stored: as sent if it is small (real ones are a few KB), else trimmed to the
    innermost frames without source lines, a shorter message and fewer context keys, marked so."""
    raw = e.model_dump_json(exclude_defaults=True)
    if len(raw) <= STORED_EVENT_MAX:
        return raw
    frames = e.frames if len(e.frames) <= TRIMMED_FRAMES else e.frames[:2] + e.frames[-(TRIMMED_FRAMES - 2):]
    frames = [f.model_copy(update={"context_line": None, "filename": f.filename[-200:],
                                   "module": f.module[-100:] if f.module else None,
                                   "function": f.function[:100]}) for f in frames]
    ctx = {k[:50]: v[:100] if isinstance(v, str) else v for k, v in list(e.context.items())[:20]}
    ctx["ctops_trimmed"] = f"stored trimmed from {len(raw)} bytes"
    small = e.model_copy(update={"frames": frames, "message": e.message[:1000], "context": ctx,
                                 "logger": e.logger[:100] if e.logger else None})
    return small.model_dump_json(exclude_defaults=True)


def _view(gid: str, h: dict[str, str], hosts: list[str], services: list[str], now: int) -> GroupView:
    status = h.get("status", "unresolved")
    mute_until = int(h["mute_until_ms"]) if h.get("mute_until_ms") else None
    if status == "muted" and mute_until is not None and mute_until <= now:
        status = "unresolved"  # the mute ran out; the next event also writes this down
        mute_until = None
    return GroupView(id=gid, type=h.get("type", "?"), message=h.get("message", ""), culprit=h.get("culprit", ""),
                     count=int(h.get("count", 0)), first_seen_ms=int(h.get("first_ms", 0)),
                     last_seen_ms=int(h.get("last_ms", 0)), hosts=hosts, services=services,
                     status=status,
                     assignee=h.get("assignee") or None, mute_until_ms=mute_until)

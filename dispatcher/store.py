"""What the dispatcher keeps in Redis: server states, host heartbeats, dispatcher presence, audit.

Every dispatcher reads the same keys, so a restarted dispatcher or a standby picks up the
cluster's state with no manual step.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from ctops import integrity, redisconn
from ctops.integrity import AUDIT, AUDIT_MAXLEN, seal_entry
from ctops.keys import Keys
from ctops.wire import AdminState, Heartbeat, ProcessMetrics
from dispatcher.pool import Backend

ADMIN_STATES = ("enabled", "draining", "disabled")
_PROCESSES = TypeAdapter(list[ProcessMetrics])


def admin_state_damaged(v: object) -> bool:
    if v is None:
        return False
    if isinstance(v, Exception):
        return True
    try:
        return _s(v) not in ADMIN_STATES
    except UnicodeDecodeError:
        return True


def _s(v: Any) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


# a heartbeat replaces the stored one only if it was received later: a request held up by a store
# outage (its write retried after the store is back) must not put an older state back over a newer one.
# The process list is a field of its own, sent only when it changed (ARGV[5] empty: unchanged); if the
# stored list is not the one this dispatcher last wrote (another wrote meanwhile), 2 asks for it next time.
_SAVE_HEARTBEAT = """
local got = redis.call('HMGET', KEYS[1], 'received_ms', 'procs_key')
local cur = got[1]
if cur and tonumber(cur) and tonumber(cur) > tonumber(ARGV[2]) then return 0 end
if not cur then redis.call('SADD', KEYS[2], ARGV[3]) end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'hb', ARGV[1], 'received_ms', ARGV[2], 'procs', ARGV[5], 'procs_key', ARGV[4])
  return 1
end
redis.call('HSET', KEYS[1], 'hb', ARGV[1], 'received_ms', ARGV[2])
if got[2] ~= ARGV[4] then return 2 end
return 1
"""


@dataclass(frozen=True)
class HeartbeatWrite:
    """One heartbeat as stored: `core` is its JSON without processes and events; `processes` the
    process list's JSON, None when this dispatcher wrote the same list (`process_key`) lately."""

    host: str
    core: bytes
    received_ms: int
    process_key: str
    processes: bytes | None


class Store:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.r = redis
        self.k = keys
        self.admin_damaged: list[str] = []  # servers whose staff state the last read found damaged
        self._save_heartbeat = redis.register_script(_SAVE_HEARTBEAT)

    # --- servers -------------------------------------------------------------------------------
    def health_commands(self, backends: list[Backend], by: str) -> list[list[str | int | float]]:
        """The leader's view of each server's health, as commands for a fenced write."""
        return [["HSET", self.k.server(b.name), "health", b.health, "since_ms", b.since_ms,
                 "last_check_ms", b.last_check_ms or 0, "last_error", b.last_error or "",
                 "active_sessions", b.active_sessions, "checked_by", by] for b in backends]

    async def read_admin(self, names: list[str]) -> dict[str, AdminState]:
        """Staff states; a damaged one (not UTF-8, not a state, a key of another type) is left out
        and its server named in `admin_damaged`, for the caller to repair (dispatcher/integrity.py)."""
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.hget(self.k.server(n), "admin")
        values = await pipe.execute(raise_on_error=False)
        out: dict[str, AdminState] = {}
        self.admin_damaged = []
        for n, v in zip(names, values, strict=True):
            if admin_state_damaged(v):
                self.admin_damaged.append(n)
            else:
                out[n] = _s(v) or "enabled"  # type: ignore[assignment]
        return out

    async def read_health(self, names: list[str]) -> dict[str, dict[str, str]]:
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(self.k.server(n))
        values = await pipe.execute()
        return {n: {_s(k): _s(v) for k, v in h.items()} for n, h in zip(names, values, strict=True)}  # type: ignore[misc]

    async def set_admin(self, name: str, admin: AdminState) -> None:
        # a transaction: staff states are confirmed by a replica (ctops.redisconn)
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.k.server(name), mapping={"admin": admin, "admin_since_ms": int(time.time() * 1000)})
            await p.execute()

    # --- hosts ---------------------------------------------------------------------------------
    async def save_heartbeats(self, writes: list[HeartbeatWrite]) -> list[int]:
        """Store hosts' latest heartbeats in one round trip: per write 1 stored, 0 kept out (a later one
        is stored), 2 stored but the process list stored is not this one (send it next time)."""
        # EVALSHA directly: a pipeline of Script calls asks SCRIPT EXISTS first, a second round trip
        # per batch; the script is loaded again only when Redis says it does not have it (a restart)
        for attempt in (0, 1):
            pipe = self.r.pipeline(transaction=False)
            for w in writes:
                pipe.evalsha(self._save_heartbeat.sha, 3, self.k.host(w.host), self.k.hosts, self.k.hosts_seen,
                             w.core, w.received_ms, w.host, w.process_key, w.processes or b"")
            try:
                return [int(r) for r in await pipe.execute()]
            except NoScriptError:
                if attempt:
                    raise
                await self.r.script_load(_SAVE_HEARTBEAT)
        raise AssertionError("unreachable")

    async def read_hosts(self, names: list[str]) -> dict[str, tuple[Heartbeat | None, int | None]]:
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.hmget(self.k.host(n), ["hb", "received_ms", "procs"])
        out: dict[str, tuple[Heartbeat | None, int | None]] = {}
        for i, (n, (raw, received, procs)) in enumerate(zip(names, await pipe.execute(), strict=True)):
            if i % 200 == 199:
                await asyncio.sleep(0)  # thousands of hosts: heartbeats are taken meanwhile, not held up
            hb = None
            if raw:
                try:
                    hb = Heartbeat.model_validate_json(raw)
                    if procs:
                        hb.processes = _PROCESSES.validate_json(procs)
                except ValueError:
                    hb = None  # written by an older version; the next heartbeat replaces it
            out[n] = (hb, int(received) if received else None)
        return out

    async def read_received(self) -> dict[str, int]:
        """When each host's last heartbeat was received (hosts never heard of are not in it): all the
        leader's host tracking needs, in one command however many hosts there are."""
        return {_s(n): int(t) for n, t in await self.r.zrange(self.k.hosts_seen, 0, -1, withscores=True)}  # type: ignore[misc,str-unpack]

    # --- dispatchers ---------------------------------------------------------------------------
    async def announce(self, name: str, fields: dict[str, Any], ttl_ms: int) -> None:
        key = self.k.dispatcher(name)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping=redisconn.redis_fields(fields))
        pipe.pexpire(key, ttl_ms)
        await pipe.execute()

    async def read_dispatchers(self, names: list[str]) -> dict[str, dict[str, str]]:
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(self.k.dispatcher(n))
        values = await pipe.execute()
        return {n: {_s(k): _s(v) for k, v in h.items()} for n, h in zip(names, values, strict=True)}  # type: ignore[misc]

    async def current_leader(self) -> str | None:
        raw = _s(await self.r.get(self.k.leader))
        return raw.rsplit("|", 1)[0] if raw else None

    async def current_epoch(self) -> int:
        return int(await self.r.get(self.k.epoch) or 0)

    # --- audit ---------------------------------------------------------------------------------
    async def audit(self, who: str, role: str, action: str, target: str, result: str, via: str) -> None:
        # a transaction: audit entries are confirmed by a replica (ctops.redisconn); sealed, so a
        # damaged entry is found on read (ctops.integrity)
        async with self.r.pipeline(transaction=True) as p:
            p.xadd(self.k.audit, seal_entry(self.k.audit, AUDIT, {  # type: ignore[arg-type]
                "ts_ms": int(time.time() * 1000), "who": who, "role": role, "action": action,
                "target": target, "result": result, "via": via,
            }), maxlen=AUDIT_MAXLEN, approximate=True)
            await p.execute()

    async def read_audit(self, count: int, reader: str = "dispatcher") -> list[dict[str, str]]:
        """The newest entries, checked; a damaged one is set aside and left out, never a 500."""
        entries = await integrity.read_entries(self.r, self.k, self.k.audit, AUDIT, count, reader=reader)
        return [{"id": i, **f} for i, f in entries]


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))

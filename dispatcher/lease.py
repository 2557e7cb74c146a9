"""Leadership: a lease in Redis with a fencing epoch. Exactly one dispatcher leads at a time.

The lease value is "name|epoch"; a dispatcher that finds the key gone takes it and bumps the
epoch in the same script, so every term of leadership has its own number. A leader trusts its
lease only while its last successful renewal is younger than the TTL: a leader that cannot renew
(Redis unreachable, process frozen) stops doing leader work before any standby can take over.
Leader writes go through `fenced`, which Redis refuses unless the lease still holds this
dispatcher's name and epoch, so a frozen old leader that wakes up cannot write anything.

Handover (staff "step down" / "promote"): a short-lived key "from|to" tells the leader to let
go and keeps it from taking the lease straight back; when `to` is set, only that dispatcher may
take the lease until the key expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ctops.keys import Keys

log = logging.getLogger("ctops.dispatcher.lease")

_ACQUIRE_OR_RENEW = """
local hfrom, hto = nil, nil
local h = redis.call('GET', KEYS[3])
if h then hfrom, hto = string.match(h, '^(.-)|(.*)$') end
local cur = redis.call('GET', KEYS[1])
if cur then
  local name, e = string.match(cur, '^(.*)|(%d+)$')
  if name == ARGV[1] then
    if hfrom == ARGV[1] then
      redis.call('DEL', KEYS[1])
      return {0, tonumber(e), ''}
    end
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(e), name}
  end
  return {0, tonumber(e or 0), name or ''}
end
local epoch = tonumber(redis.call('GET', KEYS[2]) or 0)
if hfrom == ARGV[1] then return {0, epoch, ''} end
if hto and hto ~= '' and hto ~= ARGV[1] then return {0, epoch, ''} end
local e = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. e, 'PX', ARGV[2])
if hto == ARGV[1] then redis.call('DEL', KEYS[3]) end
return {1, e, ARGV[1]}
"""

_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^(.*)|') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV[1] = "name|epoch" the caller believes it holds; ARGV[2] = JSON list of commands
_FENCED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for _, cmd in ipairs(cjson.decode(ARGV[2])) do redis.call(unpack(cmd)) end
return 1
"""


class NotLeader(Exception):
    """A leader-only write was refused: this dispatcher's lease or epoch is no longer current."""


class Lease:
    def __init__(self, redis: Redis, keys: Keys, name: str, ttl_ms: int, renew_ms: int,
                 on_change: Callable[[bool, int], None] | None = None) -> None:
        self.r, self.k, self.name = redis, keys, name
        self.ttl_ms, self.renew_ms = ttl_ms, renew_ms
        self.is_leader = False
        self.epoch = 0
        self.leader_name: str | None = None
        self._renewed_at = 0.0  # monotonic time of the last successful renewal (its start)
        self.on_change = on_change
        self.refused_writes = 0
        self.ticks = 0  # progress, for the loop watch
        # set by the runtime: True while a standby should not try to take the lease (see storewatch)
        self.hold_off: Callable[[], bool] | None = None
        self._script = redis.register_script(_ACQUIRE_OR_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._fenced = redis.register_script(_FENCED)

    def _set(self, leader: bool, epoch: int, leader_name: str | None) -> None:
        changed = leader != self.is_leader
        self.is_leader, self.epoch, self.leader_name = leader, epoch, leader_name
        if changed:
            log.warning("%s is now %s (epoch %d)", self.name, "leader" if leader else "standby", epoch)
            if self.on_change:
                self.on_change(leader, epoch)

    def still_valid(self) -> bool:
        """A leader trusts its lease only while its last renewal is younger than the TTL."""
        return self.is_leader and (time.monotonic() - self._renewed_at) * 1000 < self.ttl_ms

    def lease_age_ms(self) -> int | None:
        return int((time.monotonic() - self._renewed_at) * 1000) if self.is_leader else None

    def demote(self, why: str) -> None:
        if self.is_leader:
            log.warning("%s steps down: %s", self.name, why)
            self._set(False, self.epoch, None)

    async def tick(self) -> None:
        started = time.monotonic()
        if self.is_leader and not self.still_valid():
            # frozen or cut off for longer than the TTL: another dispatcher may lead by now
            self.demote("lease not renewed within its TTL")
        if not self.is_leader and self.hold_off is not None and self.hold_off():
            return
        try:
            won, epoch, holder = await asyncio.wait_for(
                self._script(keys=[self.k.leader, self.k.epoch, self.k.handover], args=[self.name, self.ttl_ms]),
                timeout=self.renew_ms / 1000)
        except (RedisError, OSError, TimeoutError) as exc:
            if self.is_leader and not self.still_valid():
                self.demote(f"cannot renew the lease: {exc}")
            return
        holder = holder.decode() if isinstance(holder, bytes) else holder
        if won:
            self._renewed_at = started
        self._set(bool(won), int(epoch), holder or None)

    async def run(self) -> None:
        while True:
            await self.tick()
            self.ticks += 1
            await asyncio.sleep(self.renew_ms / 1000)

    async def release(self) -> None:
        if self.is_leader:
            try:
                await self._release(keys=[self.k.leader], args=[self.name])
            except (RedisError, OSError):
                pass
            self._set(False, self.epoch, None)

    async def fenced(self, commands: list[list[str | int | float]]) -> None:
        """Run Redis commands atomically only if this dispatcher still holds the lease at its epoch."""
        if not self.still_valid():
            raise NotLeader(f"{self.name} does not hold a valid lease")
        ok = await self._fenced(keys=[self.k.leader], args=[f"{self.name}|{self.epoch}", json.dumps(commands)])
        if not ok:
            self.refused_writes += 1
            self.demote("a fenced write was refused: the lease moved on")
            raise NotLeader(f"{self.name} epoch {self.epoch} is stale")

    async def request_handover(self, leader: str, to: str | None) -> None:
        await self.r.set(self.k.handover, f"{leader}|{to or ''}", px=self.ttl_ms * 3)

"""Leadership: a lease in Redis with a fencing epoch. Exactly one dispatcher leads at a time.

The lease value is "name|epoch"; a dispatcher that finds the key gone takes it and bumps the
epoch in the same script, so every term of leadership has its own number. A leader that cannot
renew within the TTL (Redis unreachable, process frozen) considers itself demoted, since another
dispatcher may already hold the key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ctops.keys import Keys

log = logging.getLogger("ctops.dispatcher.lease")

_ACQUIRE_OR_RENEW = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  local e = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. e, 'PX', ARGV[2])
  return {1, e, ARGV[1]}
end
local name, e = string.match(cur, '^(.*)|(%d+)$')
if name == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(e), name}
end
return {0, tonumber(e or 0), name or ''}
"""

_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^(.*)|') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(self, redis: Redis, keys: Keys, name: str, ttl_ms: int, renew_ms: int,
                 on_change: Callable[[bool, int], None] | None = None) -> None:
        self.r, self.k, self.name = redis, keys, name
        self.ttl_ms, self.renew_ms = ttl_ms, renew_ms
        self.is_leader = False
        self.epoch = 0
        self.leader_name: str | None = None
        self._renewed_at = 0.0  # monotonic time of the last successful renewal
        self.on_change = on_change
        self._script = redis.register_script(_ACQUIRE_OR_RENEW)
        self._release = redis.register_script(_RELEASE)

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

    async def tick(self) -> None:
        started = time.monotonic()
        try:
            won, epoch, holder = await asyncio.wait_for(
                self._script(keys=[self.k.leader, self.k.epoch], args=[self.name, self.ttl_ms]),
                timeout=self.renew_ms / 1000)
        except (RedisError, OSError, TimeoutError) as exc:
            if self.is_leader and not self.still_valid():
                log.warning("lease not renewed (%s); stepping down", exc)
                self._set(False, self.epoch, None)
            return
        holder = holder.decode() if isinstance(holder, bytes) else holder
        if won:
            self._renewed_at = started
        self._set(bool(won), int(epoch), holder or None)

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.renew_ms / 1000)

    async def release(self) -> None:
        if self.is_leader:
            try:
                await self._release(keys=[self.k.leader], args=[self.name])
            except (RedisError, OSError):
                pass
            self._set(False, self.epoch, None)

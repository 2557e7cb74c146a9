"""Leadership: a lease in Redis with a fencing epoch. Exactly one dispatcher leads at a time.

The lease value is "name|epoch"; a dispatcher that finds the key gone takes it and bumps the
epoch in the same script, so every term of leadership has its own number. A leader trusts its
lease only while its last successful renewal is younger than the TTL: a leader that cannot renew
(Redis unreachable, process frozen) stops doing leader work before any standby can take over.
Leader writes go through `fenced`, which Redis refuses unless the lease still holds this
dispatcher's name and epoch, so a frozen old leader that wakes up cannot write anything.

The epoch never goes backwards: a store failover can lose the last `INCR`, so the script takes the
next epoch above both the stored one and the highest this dispatcher has seen, and a new term
counts only once a replica has the bump (`WAIT`); until then this dispatcher does not lead.

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
from redis.typing import EncodableT

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
local epoch = math.max(tonumber(redis.call('GET', KEYS[2]) or 0), tonumber(ARGV[3]))
if hfrom == ARGV[1] then return {0, epoch, ''} end
if hto and hto ~= '' and hto ~= ARGV[1] then return {0, epoch, ''} end
local e = epoch + 1
redis.call('SET', KEYS[2], e)
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
                 on_change: Callable[[bool, int], None] | None = None, *, replica_acks: int = 0,
                 ack_timeout_ms: int = 100, hold_off: Callable[[], bool] | None = None) -> None:
        self.r, self.k, self.name = redis, keys, name
        self.ttl_ms, self.renew_ms = ttl_ms, renew_ms
        self.is_leader = False
        self.epoch = 0
        self.leader_name: str | None = None
        self._renewed_at = 0.0  # monotonic time of the last successful renewal (its start)
        self.on_change = on_change
        self.refused_writes = 0
        self._rechecking = False
        self.ticks = 0  # progress, for the loop watch
        # True while a standby should not try to take the lease (see storewatch)
        self.hold_off = hold_off
        self.replica_acks = replica_acks
        # WAIT must fit in a tick, which is bounded by the renew interval
        self.ack_timeout_ms = max(1, min(ack_timeout_ms, renew_ms // 2))
        self.highest_epoch = 0  # the highest epoch this dispatcher has seen; it never takes a lower one
        self.unconfirmed_terms = 0  # terms not taken because no replica confirmed the epoch in time
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

    def recheck(self, why: str) -> None:
        """Someone claims a newer term (a peer's heartbeat): ask the lease, not the claimant. Steps
        down only if Redis shows the lease is no longer this dispatcher's at its epoch, so no message
        on the ops port can make a leader with a valid lease let go."""
        if not self.is_leader or self._rechecking:
            return
        self._rechecking = True
        asyncio.get_running_loop().create_task(self._recheck(why))

    async def _recheck(self, why: str) -> None:
        try:
            cur = await asyncio.wait_for(self.r.get(self.k.leader), timeout=self.renew_ms / 1000)
        except (RedisError, OSError, TimeoutError):
            return  # cut off from Redis: the TTL rule in tick() decides, as for any leader
        finally:
            self._rechecking = False
        holder = cur.decode() if isinstance(cur, bytes) else cur
        if self.is_leader and holder != f"{self.name}|{self.epoch}":
            self.demote(f"{why}; the lease is {holder or 'free'}")

    async def tick(self) -> None:
        started = time.monotonic()
        holder: str | bytes | None
        if self.is_leader and not self.still_valid():
            # frozen or cut off for longer than the TTL: another dispatcher may lead by now
            self.demote("lease not renewed within its TTL")
        if not self.is_leader and self.hold_off is not None and self.hold_off():
            return
        try:
            won, epoch, holder, acks = await asyncio.wait_for(self._acquire_or_renew(), timeout=self.renew_ms / 1000)
        except (RedisError, OSError, TimeoutError) as exc:
            if self.is_leader and not self.still_valid():
                self.demote(f"cannot renew the lease: {exc}")
            return
        holder = holder.decode() if isinstance(holder, bytes) else holder
        epoch = int(epoch)
        if epoch < self.highest_epoch:
            # a failover lost the newest epoch; the next term this dispatcher takes is above it anyway
            log.warning("%s: the store's epoch %d is below the %d seen before (writes lost in a failover?)",
                        self.name, epoch, self.highest_epoch)
            if won:
                won = False  # never lead at an epoch that an older term already used
        self.highest_epoch = max(self.highest_epoch, epoch)
        new_term = bool(won) and not (self.is_leader and epoch == self.epoch)
        if new_term and acks is not None and acks < self.replica_acks:
            # the bump may not survive a failover: the term starts once a replica has it (next tick)
            self.unconfirmed_terms += 1
            log.warning("%s: epoch %d is on %d replicas, %d needed; not leading yet", self.name, epoch, acks,
                        self.replica_acks)
            won, holder = False, None
        if won:
            self._renewed_at = started
        self._set(bool(won), epoch, holder or None)

    async def _acquire_or_renew(self) -> tuple[int, int, str | bytes, int | None]:
        args: list[EncodableT] = [self.name, self.ttl_ms, self.highest_epoch]
        keys = [self.k.leader, self.k.epoch, self.k.handover]
        if not self.replica_acks or self.is_leader:  # a renewal starts no term: nothing to confirm
            won, epoch, holder = await self._script(keys=keys, args=args)
            return won, epoch, holder, None
        # WAIT counts the writes of its own connection: the script and WAIT go down one pipeline
        async with self.r.pipeline(transaction=False) as p:
            await self._script(keys=keys, args=args, client=p)
            p.execute_command("WAIT", self.replica_acks, self.ack_timeout_ms)
            (won, epoch, holder), acks = await p.execute()
        return won, epoch, holder, int(acks)

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

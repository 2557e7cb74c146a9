"""Watches the shared store (Redis) for staff: which node is primary, replicas and their lag, the
Sentinels, failovers, writes a replica did not confirm, and whether the store answers at all.

Every dispatcher runs it. A round asks the Sentinels (`SENTINEL MASTER/REPLICAS/SENTINELS`) and the
primary (`PING`, `INFO replication`) on clients of its own with short timeouts, so a hung store
costs this loop a bounded wait and never the data plane or the other loops. In one-node setups
the configured node is the primary and the lists are empty.

What it learns also keeps a store outage from cascading: the health checks ask whether this
dispatcher steadily reaches the store (`steadily_reachable`) before blaming a server that cannot,
and host heartbeat ages leave out the time the store was away (`blind_ms`), since heartbeats
could not be stored then.

Events: store_unavailable / store_back (written once the store is back, by the dispatcher that
led when it went away), store_failover_started / store_failover (every dispatcher, deduplicated by
the Sentinels' config epoch), and, from the leader only, store_replica_lost / _back,
store_sentinel_lost / _back and store_writes_unconfirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ctops import redisconn
from ctops.clock import now_ms
from ctops.config import RedisSettings
from ctops.keys import Keys
from ctops.opsapi import STORE_FAILOVER_WAIT_S
from ctops.wire import Severity, StoreReplicaView, StoreSentinelView, StoreView
from dispatcher.integrity import integrity_summary

log = logging.getLogger("ctops.dispatcher.storewatch")

INTERVAL_S = 0.25
TIMEOUT_S = 0.5
# no successful probe for this long and the store counts as unavailable
UNAVAILABLE_AFTER_S = 1.0
# the store must answer this long in a row before a server that says it cannot reach it is blamed
STEADY_AFTER_S = 2.0
UNCONFIRMED_EVENT_EVERY_S = 10.0
# after an outage, a dispatcher that did not lead leaves the lease this long to the one that did
LEADERSHIP_HOLD_OFF_MS = 1000
OUTAGES_KEPT = 16

_pending_unconfirmed = 0


def note_unconfirmed_write(n: int = 1) -> None:
    """A write whose WAIT for a replica timed out (called by the store client in this process).

    Counted here and added to the cluster-wide counter (`Keys.store_writes_unconfirmed`, which other
    processes INCR directly) by the next round, so a caller never waits on Redis for it."""
    global _pending_unconfirmed
    _pending_unconfirmed += n


def _take_unconfirmed() -> int:
    global _pending_unconfirmed
    n, _pending_unconfirmed = _pending_unconfirmed, 0
    return n



@dataclass(frozen=True, slots=True)
class StoreEvent:
    kind: str
    severity: Severity
    message: str
    target: str | None
    event_id: str | None = None  # set: any dispatcher may write it, deduplicated; None: the leader only
    ts_ms: int | None = None


Emit = Callable[[StoreEvent], Awaitable[None]]


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pairs(raw: object) -> dict[str, str]:
    """A Sentinel reply's flat [field, value, ...] list (or a RESP3 map) as a dict of strings."""
    if isinstance(raw, dict):
        return {_s(k): _s(v) for k, v in raw.items()}
    items = [_s(x) for x in raw] if isinstance(raw, list | tuple) else []
    return dict(zip(items[0::2], items[1::2], strict=False))


def _flags(d: dict[str, str]) -> set[str]:
    return set(d.get("flags", "").split(","))


def _down(d: dict[str, str]) -> bool:
    return bool(_flags(d) & {"s_down", "o_down", "disconnected"})


def parse_replication(info: str) -> dict[tuple[str, int], tuple[str, int]]:
    """`INFO replication` of a primary -> {(ip, port): (state, lag seconds)} of its replicas."""
    out: dict[tuple[str, int], tuple[str, int]] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if not (key.startswith("slave") and key[5:].isdigit()):
            continue
        f = dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
        try:
            out[(f["ip"], int(f["port"]))] = (f.get("state", "?"), int(f.get("lag", "0")))
        except (KeyError, ValueError):
            continue
    return out


class StoreWatch:
    def __init__(self, settings: RedisSettings, keys: Keys, name: str, is_leader: Callable[[], bool],
                 emit: Emit | None = None, interval: float = INTERVAL_S,
                 servers_unconfirmed: Callable[[], int] | None = None) -> None:
        self.settings, self.keys, self.name = settings, keys, name
        self.is_leader = is_leader
        self.emit = emit
        self.interval = interval
        # trainers count their own (each since its start) and say so in their readiness answers
        self.servers_unconfirmed = servers_unconfirmed or (lambda: 0)
        self._confirm_seen = redisconn.CONFIRM.unconfirmed
        self.sentinel_addrs = redisconn.sentinel_addresses(settings)
        self.service = settings.service
        self.node_names = dict(settings.nodes)
        self.rounds = 0  # progress, for the loop watch
        self.last_ok: float | None = None  # monotonic: the primary last answered
        self.ok_since: float | None = None  # monotonic: start of the current run of answers
        self.outages: deque[list[int | None]] = deque(maxlen=OUTAGES_KEPT)  # [start_ms, end_ms | None]
        self._was_available: bool | None = None
        self._leader_when_ok = False
        self._outage_owner = False  # this dispatcher led when the store went away
        self.primary: str | None = None
        self.primary_addr: tuple[str, int] | None = None
        self.replicas: list[StoreReplicaView] = []
        self.sentinels: list[StoreSentinelView] = []
        self.failover_in_progress = False
        self.config_epoch: int | None = None
        self.last_failover_ms: int | None = None
        self.writes_unconfirmed = 0
        self.integrity: dict[str, Any] = {}
        self.error: str | None = None
        self.checked_ms: int | None = None
        self.pending: deque[StoreEvent] = deque(maxlen=200)
        self._states: dict[str, str] | None = None  # replica and sentinel states seen last round
        self._unconfirmed_seen: int | None = None
        self._unconfirmed_reported_at = 0.0
        self._clients: dict[tuple[str, int, str], Redis] = {}

    # --- what others ask ------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "sentinel" if self.sentinel_addrs else "single"

    def available(self) -> bool:
        return self.last_ok is not None and time.monotonic() - self.last_ok < UNAVAILABLE_AFTER_S

    def steadily_reachable(self) -> bool:
        now = time.monotonic()
        return (self.available() and self.ok_since is not None and now - self.ok_since >= STEADY_AFTER_S)

    def blind_ms(self, since_ms: int, now: int | None = None) -> int:
        """How much of [since_ms, now] the store was away (heartbeats could not be stored then)."""
        now = now or now_ms()
        total = 0
        for start, end in self.outages:
            lo, hi = max(since_ms, start or 0), min(now, end if end is not None else now)
            if hi > lo:
                total += hi - lo
        return total

    def defer_leadership(self) -> bool:
        """While the store is away, and for a moment after, only the dispatcher that led when it went
        away may take the lease: it does so at its first tick once the store is back, and a standby
        that happened to tick first would make a needless leader change. Had the leader died meanwhile,
        the standby takes over after the moment."""
        if self._outage_owner or not self.outages:
            return False
        end = self.outages[-1][1]
        return end is None or now_ms() - end < LEADERSHIP_HOLD_OFF_MS

    def view(self) -> StoreView:
        available = self.available()
        since = self.outages[-1][0] if self.outages and self.outages[-1][1] is None else None
        diagnosis = None
        if not available:
            where = self.primary
            silent = f" for {(now_ms() - since) / 1000:.0f} s" if since else ""
            diagnosis = (f"shared state unavailable: {where or 'no primary'} not answering{silent}; "
                         "routing continues on the last known state")
        elif self.primary is None:
            diagnosis = "shared state has no primary"
        return StoreView(mode=self.mode, available=available, primary=self.primary,
                         replicas=list(self.replicas), sentinels=list(self.sentinels),
                         last_failover_ms=self.last_failover_ms, failover_in_progress=self.failover_in_progress,
                         writes_unconfirmed=self.writes_unconfirmed, unavailable_since_ms=since,
                         corrupt_found=self.integrity.get("corrupt_found") or 0,
                         repaired=self.integrity.get("repaired") or 0,
                         last_scrub_ms=self.integrity.get("last_scrub_ms"),
                         diagnosis=diagnosis, error=self.error, checked_ms=self.checked_ms)

    def node_name(self, addr: tuple[str, int] | None) -> str | None:
        if addr is None:
            return None
        key = f"{addr[0]}:{addr[1]}"
        return self.node_names.get(key, key)

    # --- clients --------------------------------------------------------------------------------
    def _single_addr(self) -> tuple[str, int]:
        from urllib.parse import urlsplit  # noqa: PLC0415 - only for one-node setups

        u = urlsplit(self.settings.url)
        return (u.hostname or "127.0.0.1", u.port or 6379)

    def _client(self, addr: tuple[str, int], kind: str) -> Redis:
        """One client per node, apart from the dispatcher's own, with short timeouts and no retries:
        a slow answer is itself the news here."""
        key = (addr[0], addr[1], kind)
        c = self._clients.get(key)
        if c is None:
            if kind == "sentinel":
                c = Redis(host=addr[0], port=addr[1], password=redisconn.sentinel_password(self.settings),
                          socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, decode_responses=True)
            elif self.mode == "single":
                c = Redis.from_url(self.settings.url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                                   decode_responses=True, **_credentials(self.settings))
            else:
                c = Redis(host=addr[0], port=addr[1], socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                          decode_responses=True, **_credentials(self.settings))
            self._clients[key] = c
        return c

    async def aclose(self) -> None:
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.aclose()
        self._clients.clear()

    # --- one round ------------------------------------------------------------------------------
    async def _ask_sentinel(self, addr: tuple[str, int]) -> tuple[dict[str, str], list[dict[str, str]],
                                                                   list[dict[str, str]]]:
        c = self._client(addr, "sentinel")
        async with asyncio.timeout(TIMEOUT_S):
            master = _pairs(await c.execute_command("SENTINEL", "MASTER", self.service))
            replicas = [_pairs(r) for r in await c.execute_command("SENTINEL", "REPLICAS", self.service)]
            others = [_pairs(s) for s in await c.execute_command("SENTINEL", "SENTINELS", self.service)]
        return master, replicas, others

    async def _sentinel_round(self) -> tuple[dict[str, str] | None, list[dict[str, str]]]:
        answers = await asyncio.gather(*(self._ask_sentinel(a) for a in self.sentinel_addrs), return_exceptions=True)
        sentinels: list[StoreSentinelView] = []
        masters: list[tuple[dict[str, str], list[dict[str, str]]]] = []
        for addr, ans in zip(self.sentinel_addrs, answers, strict=True):
            name = self.node_name(addr) or ""
            if isinstance(ans, BaseException):
                sentinels.append(StoreSentinelView(name=name, state="down", address=f"{addr[0]}:{addr[1]}"))
                continue
            sentinels.append(StoreSentinelView(name=name, state="up", address=f"{addr[0]}:{addr[1]}"))
            masters.append((ans[0], ans[1]))
        self.sentinels = sentinels
        if not masters:
            self.error = "no Sentinel answered"
            return None, []
        # the primary most Sentinels name; ties go to the highest config epoch (the latest failover)
        votes = Counter((m.get("ip"), m.get("port")) for m, _ in masters)
        best = max(masters, key=lambda mr: (votes[(mr[0].get("ip"), mr[0].get("port"))],
                                            int(mr[0].get("config-epoch", "0") or 0)))
        return best[0], best[1]

    async def _primary_round(self, addr: tuple[str, int]) -> dict[tuple[str, int], tuple[str, int]] | None:
        c = self._client(addr, "primary")
        async with asyncio.timeout(TIMEOUT_S):
            await c.ping()
        self._mark_ok()
        try:
            async with asyncio.timeout(TIMEOUT_S):
                info = await c.execute_command("INFO", "replication")
        except (RedisError, OSError, TimeoutError):
            return None  # a detail (the role may not be allowed INFO): the Sentinels' view stands in
        return parse_replication(_s(info) if not isinstance(info, dict) else
                                 "\n".join(f"{k}:{_flat(v)}" for k, v in info.items()))

    def _mark_ok(self) -> None:
        now = time.monotonic()
        if not self.available() or self.ok_since is None:
            self.ok_since = now
        self.last_ok = now
        self._leader_when_ok = self.is_leader()

    async def round(self) -> None:
        self.checked_ms = now_ms()
        replication: dict[tuple[str, int], tuple[str, int]] | None = None
        if self.mode == "single":
            addr = self._single_addr()
            self.primary, self.primary_addr = self.node_name(addr), addr
            try:
                await self._primary_round(addr)
                self.error = None
            except (RedisError, OSError, TimeoutError) as exc:
                self.error = _why(exc)
        else:
            master, replicas = await self._sentinel_round()
            self._apply_sentinel_view(master)
            if self.primary_addr is not None:
                try:
                    replication = await self._primary_round(self.primary_addr)
                    self.error = None
                except (RedisError, OSError, TimeoutError) as exc:
                    self.error = f"primary {self.primary}: {_why(exc)}"
            # in a stable order for staff (Sentinels list replicas as they learnt them)
            self.replicas = sorted((self._replica_view(r, replication) for r in replicas), key=lambda v: v.name)
        self._track_availability()
        if self.available():
            await self._sync_unconfirmed()
            await self._sync_integrity()
        self._track_nodes()
        if self.available():
            await self._flush()

    def _apply_sentinel_view(self, master: dict[str, str] | None) -> None:
        if master is None:
            return  # no Sentinel answered: keep the last known primary, unavailable if it stops answering
        try:
            addr: tuple[str, int] | None = (master["ip"], int(master["port"]))
        except (KeyError, ValueError):
            addr = None
        flags = _flags(master)
        in_progress = bool(flags & {"failover_in_progress", "promoted"})
        epoch = int(master.get("config-epoch", "0") or 0)
        old, old_name = self.primary_addr, self.primary
        if in_progress and not self.failover_in_progress and old_name is not None:
            self.pending.append(StoreEvent(
                "store_failover_started", "warning", f"store failover started: primary {old_name} is down",
                old_name, event_id=f"store_failover_started:{self.service}:{epoch}"))
        self.failover_in_progress = in_progress
        self.primary_addr = addr
        self.primary = self.node_name(addr) if addr else None
        if old is not None and addr is not None and addr != old:
            self.last_failover_ms = now_ms()
            self.pending.append(StoreEvent(
                "store_failover", "warning", f"store failover: primary {old_name} -> {self.primary} "
                f"(epoch {epoch})", self.primary, event_id=f"store_failover:{self.service}:{epoch}"))
            log.warning("store primary changed: %s -> %s (epoch %d)", old_name, self.primary, epoch)
        self.config_epoch = epoch

    def _replica_view(self, r: dict[str, str],
                      replication: dict[tuple[str, int], tuple[str, int]] | None) -> StoreReplicaView:
        try:
            addr = (r["ip"], int(r["port"]))
        except (KeyError, ValueError):
            return StoreReplicaView(name=r.get("name", "?"), state="unknown")
        seen = replication.get(addr) if replication is not None else None
        if _down(r):
            state = "down"
        elif replication is not None:
            # the primary's own list is current; a Sentinel refreshes a replica's link state only every 10 s
            state = "up" if seen is not None and seen[0] == "online" else "syncing"
        else:
            state = "up" if r.get("master-link-status", "ok") == "ok" else "syncing"
        lag = seen[1] * 1000 if seen is not None else None
        return StoreReplicaView(name=self.node_name(addr) or "?", state=state, lag_ms=lag,
                                address=f"{addr[0]}:{addr[1]}")

    def _track_availability(self) -> None:
        available = self.available()
        before, self._was_available = self._was_available, available
        if before is None or available == before:
            return
        last_ok_ms = now_ms() - int((time.monotonic() - self.last_ok) * 1000) if self.last_ok else now_ms()
        if not available:
            self.ok_since = None
            self._outage_owner = self._leader_when_ok
            self.outages.append([last_ok_ms, None])
            log.error("shared store unavailable (last answer %d ms ago): %s", now_ms() - last_ok_ms, self.error)
            return
        start = self.outages[-1][0] if self.outages and self.outages[-1][1] is None else None
        if start is None:
            return
        self.outages[-1][1] = now_ms()
        log.warning("shared store answering again after %.1f s", (now_ms() - start) / 1000)
        if self._outage_owner:
            # the dispatcher that led when the store went away tells the story once it can be written
            where = self.primary or "the store"
            self.pending.append(StoreEvent("store_unavailable", "critical",
                                           f"shared state unavailable: {where} did not answer", where,
                                           event_id=f"store_unavailable:{self.name}:{start}", ts_ms=start))
            self.pending.append(StoreEvent("store_back", "info", f"shared state back after "
                                           f"{(now_ms() - start) / 1000:.1f} s", where,
                                           event_id=f"store_back:{self.name}:{start}"))

    def _track_nodes(self) -> None:
        states: dict[str, str] = {f"replica:{r.name}": r.state for r in self.replicas}
        states |= {f"sentinel:{s.name}": s.state for s in self.sentinels}
        before, self._states = self._states, states
        if before is None:
            return
        for key, state in states.items():
            old = before.get(key)
            if old is None or (old == "down") == (state == "down"):
                continue
            kind, _, name = key.partition(":")
            if state == "down":
                self._leader_event(f"store_{kind}_lost", "warning", f"store {kind} {name} is down", name)
            else:
                self._leader_event(f"store_{kind}_back", "info", f"store {kind} {name} is back ({state})", name)

    async def _sync_unconfirmed(self) -> None:
        # this process's store client counts what it kept unconfirmed (ctops.redisconn.CONFIRM)
        confirm = redisconn.CONFIRM.unconfirmed
        note_unconfirmed_write(confirm - self._confirm_seen)
        self._confirm_seen = confirm
        n = _take_unconfirmed()
        key = self.keys.store_writes_unconfirmed
        c = self._client(self.primary_addr or self._single_addr(), "primary")
        try:
            async with asyncio.timeout(TIMEOUT_S):
                total = int(await c.incrby(key, n) if n else (await c.get(key) or 0))
        except (RedisError, OSError, TimeoutError, ValueError):
            note_unconfirmed_write(n)  # counted next time
            return
        total += self.servers_unconfirmed()
        self.writes_unconfirmed = total
        if self._unconfirmed_seen is None:
            self._unconfirmed_seen = total  # what was counted before this dispatcher started is not news
            return
        now = time.monotonic()
        if total <= self._unconfirmed_seen or now - self._unconfirmed_reported_at < UNCONFIRMED_EVENT_EVERY_S:
            return  # a burst of timeouts becomes one event per interval
        self._unconfirmed_reported_at = now
        self._leader_event("store_writes_unconfirmed", "warning",
                           f"{total - self._unconfirmed_seen} write(s) not confirmed by a replica in time "
                           f"(WAIT timed out); {total} in all", self.primary)
        self._unconfirmed_seen = total

    async def _sync_integrity(self) -> None:
        # damaged records found and repaired, and the last scrub (dispatcher/integrity.py)
        c = self._client(self.primary_addr or self._single_addr(), "primary")
        try:
            async with asyncio.timeout(TIMEOUT_S):
                self.integrity = await integrity_summary(c, self.keys)
        except (RedisError, OSError, TimeoutError, ValueError):
            return

    def _leader_event(self, kind: str, severity: Severity, message: str, target: str | None) -> None:
        if self.is_leader():
            self.pending.append(StoreEvent(kind, severity, message, target))

    async def _flush(self) -> None:
        while self.pending and self.emit is not None:
            ev = self.pending[0]
            try:
                await self.emit(ev)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("store event %s not recorded yet: %s", ev.kind, exc)
                return
            self.pending.popleft()

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except Exception:  # noqa: BLE001 - a status loop must outlive any one odd answer
                log.exception("store watch round failed")
            self.rounds += 1
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    # --- staff action ---------------------------------------------------------------------------
    async def failover(self, wait_s: float = STORE_FAILOVER_WAIT_S) -> tuple[str | None, str | None]:
        """SENTINEL FAILOVER through the first Sentinel that takes it; waits for the primary to change.
        Returns (before, after); raises LookupError without Sentinels, RuntimeError if none accepts."""
        if not self.sentinel_addrs:
            raise LookupError("this store is one node without Sentinels: there is nothing to fail over to")
        before = self.primary
        errors = []
        for addr in self.sentinel_addrs:
            try:
                async with asyncio.timeout(TIMEOUT_S * 4):
                    await self._client(addr, "sentinel").execute_command("SENTINEL", "FAILOVER", self.service)
                break
            except (RedisError, OSError, TimeoutError) as exc:
                errors.append(f"{self.node_name(addr)}: {_why(exc)}")
        else:
            raise RuntimeError("; ".join(errors))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.primary not in (None, before):
                break
            await asyncio.sleep(0.1)
        return before, self.primary


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _flat(v: Any) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def _credentials(settings: RedisSettings) -> dict[str, Any]:
    """The dispatcher role's ACL user, when the deployment names one ([redis.users])."""
    username, password = redisconn.credentials(settings, "dispatcher")
    return {"username": username, "password": password or ""} if username else {}

"""One dispatcher process's moving parts and the loops that keep them in step with Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ctops.clock import now_ms
from ctops.config import Deployment, DispatcherSpec
from ctops.keys import Keys
from ctops.wire import ClusterState, DispatcherView, Heartbeat, HostState, HostView, PeerHeartbeat, ServerView
from dispatcher.events import EventLog
from dispatcher.health import HealthChecker
from dispatcher.integrity import repair_admin_state
from dispatcher.lease import Lease, NotLeader
from dispatcher.peers import Peers
from dispatcher.planebuild import data_plane_build
from dispatcher.pool import Backend, ServerPool
from dispatcher.store import Store
from dispatcher.storewatch import StoreEvent, StoreWatch

log = logging.getLogger("ctops.dispatcher")

# reads behind GET /api/v1/state give up this soon and fall back to what was read last
STATE_READ_TIMEOUT_S = 0.5
SYNC_ROUND_TIMEOUT_S = 2.0
SHARED_STATE = "shared state unavailable"


class Runtime:
    """Keeps this dispatcher in step with the cluster: reacts to server and leadership changes,
    syncs staff actions from Redis, publishes health as leader, and builds the state view. Its
    parts are built and handed in by the composition root (`dispatcher.main.build`)."""

    def __init__(self, dep: Deployment, spec: DispatcherSpec, redis: Redis, keys: Keys, store: Store,
                 pool: ServerPool, lease: Lease, events: EventLog, storewatch: StoreWatch, peers: Peers,
                 health: HealthChecker) -> None:
        self.dep, self.spec, self.redis, self.keys = dep, spec, redis, keys
        self.store, self.pool, self.lease, self.events = store, pool, lease, events
        self.storewatch, self.peers, self.health = storewatch, peers, health
        # what was last read from the store, shown (marked by the store's state) while it is away
        self._hosts_raw: dict[str, tuple[Heartbeat | None, int | None]] = {}
        self._dispatchers_raw: dict[str, dict[str, str]] = {}
        self._host_states: dict[str, str] = {}
        self._publish_pending = False
        self.sync_rounds = 0  # progress, for the loop watch
        self.started_ms = now_ms()

    # --- state changes -------------------------------------------------------------------------
    def on_server_state_change(self, b: Backend, old: str, new: str, reason: str) -> None:
        log.warning("server %s: %s -> %s (%s)", b.name, old, new, reason)
        self._publish_pending = True
        severity = "critical" if new == "down" else ("warning" if new == "suspect" else "info")
        self.emit_as_leader(f"server_{new}", severity, f"{b.name}: {old} -> {new} ({reason})", b.name)

    def on_leadership(self, leader: bool, epoch: int) -> None:
        if leader:
            self.emit_as_leader("leader_changed", "warning", f"dispatcher {self.spec.name} now leads (epoch {epoch})",
                                self.spec.name)
            # the new leader publishes its own view at once rather than at the next health round
            asyncio.get_running_loop().create_task(self._publish())
        hook = self.spec.on_promote if leader else self.spec.on_demote
        if hook:
            asyncio.get_running_loop().create_task(self._run_hook(hook, leader, epoch))

    async def _run_hook(self, argv: list[str], leader: bool, epoch: int) -> None:
        env = {**os.environ, "CTOPS_DISPATCHER": self.spec.name, "CTOPS_ROLE": "leader" if leader else "standby",
               "CTOPS_EPOCH": str(epoch)}
        try:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        except (OSError, TimeoutError) as exc:
            log.error("%s hook %s failed: %s", "promote" if leader else "demote", argv[0], exc)
            return
        log.warning("%s hook %s exited %s: %s", "promote" if leader else "demote", argv[0], proc.returncode,
                    out.decode(errors="replace").strip()[-500:])

    def loop_restarted(self, name: str, stalled_s: float) -> None:
        """Reported by every dispatcher, not only the leader: it is about this process."""
        asyncio.get_running_loop().create_task(self._record_loop_restart(name, stalled_s))

    async def _record_loop_restart(self, name: str, stalled_s: float) -> None:
        try:
            await self.events.emit("loop_restarted", "warning", f"dispatcher {self.spec.name}: {name} loop stalled "
                                   f"for {stalled_s:.1f}s and was restarted", f"dispatcher:{self.spec.name}",
                                   f"{self.spec.name}/{name}")
        except (RedisError, OSError) as exc:
            log.warning("cannot record loop restart: %s", exc)

    def peer_view(self) -> PeerHeartbeat:
        return PeerHeartbeat(name=self.spec.name, role="leader" if self.lease.still_valid() else "standby",
                             epoch=self.lease.epoch, sent_at_ms=now_ms())

    def emit_as_leader(self, kind: str, severity: str, message: str, target: str | None) -> None:
        """Derived events come from the leader only, so two dispatchers never report one change twice."""
        if not self.lease.still_valid():
            return
        asyncio.get_running_loop().create_task(self._emit(kind, severity, message, target))

    async def _emit(self, kind: str, severity: str, message: str, target: str | None) -> None:
        cmd = self.events.emit_command(kind, severity, message, f"dispatcher:{self.spec.name}", target)  # type: ignore[arg-type]
        try:
            await self.lease.fenced([cmd])
        except NotLeader as exc:
            log.warning("event %s not recorded: %s", kind, exc)
        except (RedisError, OSError) as exc:
            log.warning("cannot record event %s: %s", kind, exc)

    async def emit_store_event(self, ev: StoreEvent) -> None:
        """Store events with an id are written by whichever dispatcher saw them (deduplicated by the
        id); the others only by the leader. A Redis error propagates: the watch keeps the event."""
        source = f"dispatcher:{self.spec.name}"
        if ev.event_id is not None:
            await self.events.emit(ev.kind, ev.severity, ev.message, source, ev.target, event_id=ev.event_id,
                                   ts_ms=ev.ts_ms)
            return
        try:
            await self.lease.fenced([self.events.emit_command(ev.kind, ev.severity, ev.message, source, ev.target)])
        except NotLeader as exc:
            log.warning("store event %s not recorded: %s", ev.kind, exc)

    def _track_hosts(self, received: dict[str, int | None]) -> None:
        now = now_ms()
        source = f"dispatcher:{self.spec.name}"
        found: list[list[str | int | float]] = []
        for name, at in received.items():
            state = self.host_state(at, now)
            before = self._host_states.get(name)
            self._host_states[name] = state
            if before is None:
                continue
            if state == "lost" and before != "lost":
                found.append(self.events.emit_command("host_lost", "critical", f"{name}: no heartbeat for "
                                                      f"{(now - at if at else 0) / 1000:.1f}s", source, name))
            elif before == "lost" and state != "lost":
                found.append(self.events.emit_command("host_back", "info", f"{name}: heartbeats again", source, name))
        if found and self.lease.still_valid():
            # one fenced write for the round: a rack of hosts lost at once is one round trip, not a
            # connection each (a burst of those once starved the lease renewal of connections)
            asyncio.get_running_loop().create_task(self._emit_commands(found))

    async def _emit_commands(self, commands: list[list[str | int | float]]) -> None:
        try:
            await self.lease.fenced(commands)
        except NotLeader as exc:
            log.warning("%d host events not recorded: %s", len(commands), exc)
        except (RedisError, OSError) as exc:
            log.warning("cannot record %d host events: %s", len(commands), exc)

    def host_state(self, received: int | None, now: int) -> HostState:
        """alive, late or lost, by when the host's last heartbeat was received."""
        if not received:
            return "lost"
        # heartbeats that came while the store was away could not be stored: that time is not silence
        silent = now - received - self.storewatch.blind_ms(received, now)
        t = self.dep.timings
        return "lost" if silent > t.heartbeat_timeout_ms else ("late" if silent > t.heartbeat_interval_ms * 2 else
                                                               "alive")

    def health_round_done(self) -> None:
        # only the leader publishes health to Redis; standbys keep their own view for routing
        if self.lease.still_valid():
            asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        try:
            await self.lease.fenced(self.store.health_commands(list(self.pool), self.spec.name))
            self._publish_pending = False
        except NotLeader as exc:
            log.warning("server health not published: %s", exc)
        except (RedisError, OSError) as exc:
            log.warning("cannot publish server health: %s", exc)

    async def sync_admin_once(self) -> None:
        admin = await self.store.read_admin(list(self.pool.backends))
        for name in self.store.admin_damaged:
            await repair_admin_state(self.redis, self.keys, name, self.pool.get(name), self.spec.name)
        for name, state in admin.items():
            b = self.pool.get(name)
            if b is not None and b.admin != state:
                self.pool.set_admin(b, state, "staff action")

    async def _sync_once(self) -> None:
        await self.sync_admin_once()
        if self.lease.still_valid():
            # four times a second: when each host was last heard of, not its whole heartbeat
            seen = await self.store.read_received()
            self._track_hosts({a.name: seen.get(a.name) for a in self.dep.agents})
        await self.store.announce(self.spec.name, {
            "ops_url": self.spec.ops_url, "data_url": self.spec.data_url, "pid": os.getpid(),
            "role": "leader" if self.lease.still_valid() else "standby",
            "epoch": self.lease.epoch, "seen_ms": now_ms(),
        }, ttl_ms=max(5000, self.dep.timings.lease_ttl_ms * 5))

    async def sync_loop(self) -> None:
        """Staff actions taken through any dispatcher reach this one within one tick."""
        while True:
            try:
                # bounded: the store client waits out a failover (~11 s of retries), and a round stuck
                # that long would look like a stalled loop to the loop watch, a false alarm for staff
                await asyncio.wait_for(self._sync_once(), SYNC_ROUND_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("sync with Redis failed: %s", exc or type(exc).__name__)
            self.sync_rounds += 1
            await asyncio.sleep(0.25)

    async def restore_from_redis(self) -> None:
        """A restarted dispatcher starts from the state the cluster already knows."""
        try:
            await self.sync_admin_once()
        except (RedisError, OSError) as exc:
            log.warning("cannot read state from Redis at start: %s", exc)

    # --- views ---------------------------------------------------------------------------------
    async def _read(self, what: str, read, cache: dict) -> dict:  # noqa: ANN001 - an awaitable factory
        """A read for the state view: bounded, and the last answer while the store is away."""
        if self.storewatch.rounds == 0 or self.storewatch.available():
            try:
                fresh = await asyncio.wait_for(read(), STATE_READ_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("state view: cannot read %s from the store (%s); showing the last known", what, exc)
            else:
                cache.clear()
                cache.update(fresh)
        return dict(cache)

    async def host_views(self) -> list[HostView]:
        dep, now = self.dep, now_ms()
        host_names = [a.name for a in dep.agents]
        hosts_raw = await self._read("hosts", lambda: self.store.read_hosts(host_names), self._hosts_raw)
        hosts: list[HostView] = []
        for i, name in enumerate(host_names):
            if i % 200 == 199:
                await asyncio.sleep(0)  # thousands of hosts: heartbeats are taken meanwhile, not held up
            hb, received = hosts_raw.get(name, (None, None))
            age = now - received if received else None
            state = self.host_state(received, now)
            hosts.append(HostView(name=name, state=state, heartbeat_age_ms=age, seq=hb.seq if hb else None,
                                  metrics=hb.metrics if hb else None, processes=hb.processes if hb else [],
                                  watchdog=hb.watchdog if hb else None))
        return hosts

    async def cluster_state(self, proxy: dict | None = None) -> ClusterState:
        """The state view; `proxy`: the data plane's counters, when it runs."""
        dep, now = self.dep, now_ms()
        hosts = await self.host_views()
        by_host = {h.name: h for h in hosts}
        names = [d.name for d in dep.dispatchers]
        disp_raw = await self._read("dispatchers", lambda: self.store.read_dispatchers(names), self._dispatchers_raw)
        store = self.storewatch.view()

        servers = []
        for b in self.pool:
            hv = by_host.get(b.server_host)
            diagnosis, detail = diagnose(b, hv, None if store.available else store.diagnosis)
            servers.append(ServerView(
                diagnosis=diagnosis, diagnosis_detail=detail,
                name=b.name, url=b.url, host=b.server_host, state=b.state, admin=b.admin,
                health=b.health, active_sessions=b.active_sessions, weight=b.weight,
                last_check_ms=b.last_check_ms, last_error=b.last_error, since_ms=b.since_ms,
                heartbeat_age_ms=hv.heartbeat_age_ms if hv else None,
                cpu_percent=hv.metrics.cpu_percent if hv and hv.metrics else None,
                memory_percent=hv.metrics.memory_percent if hv and hv.metrics else None,
            ))

        leader = self.spec.name if self.lease.still_valid() else self.lease.leader_name
        if leader != self.spec.name and not store.available:
            # no lease can be renewed while the store is away: the last holder seen leads no more
            leader = None
        dispatchers = []
        stale_after = max(3000, dep.timings.lease_ttl_ms * 3)
        for d in dep.dispatchers:
            raw = disp_raw.get(d.name) or {}
            seen = int(raw["seen_ms"]) if raw.get("seen_ms") else None
            me = d.name == self.spec.name
            heard = self.peers.heard.get(d.name)
            healthy = me or (seen is not None and now - seen < stale_after)
            if not healthy and not store.available and heard is not None:
                # its presence cannot be stored now; its direct heartbeat still says it is there
                healthy = (time.monotonic() - heard) * 1000 < stale_after
            role = "leader" if d.name == leader else ("standby" if healthy else "unknown")
            dispatchers.append(DispatcherView(
                name=d.name, role=role, healthy=healthy, ops_url=d.ops_url, data_url=d.data_url,
                epoch=self.lease.epoch if me else (int(raw["epoch"]) if raw.get("epoch") else None),
                last_seen_ms=now if me else seen,
                lease_age_ms=self.lease.lease_age_ms() if me else None,
                peer_heartbeat_age_ms=self.peers.age_ms() if me else (
                    int((time.monotonic() - heard) * 1000) if heard else None)))
        return ClusterState(cluster=dep.cluster, leader=leader, served_by=self.spec.name, now_ms=now,
                            dispatchers=dispatchers, servers=servers, hosts=hosts, proxy=proxy, store=store,
                            rejected=dict(self.storewatch.integrity.get("rejected") or {}),
                            data_plane=data_plane_build())


def diagnose(b: Backend, host: HostView | None, store_down: str | None = None) -> tuple[str, str | None]:
    """Combine the dispatcher's checks with the host agent's heartbeat (tactic T4).

    `store_down`: why the shared store is away, if it is. Then heartbeats cannot be stored, so a
    silent agent says nothing about its host; the store is the fault staff need to see."""
    if b.admin != "enabled":
        # the admin state shows in the server's state; a fault under it must not disappear behind it
        fault, detail = _fault(b, host, store_down)
        if fault == "ok":
            return "admin", f"{b.admin} by staff"
        return fault, f"{b.admin} by staff; {detail}"
    return _fault(b, host, store_down)


def _fault(b: Backend, host: HostView | None, store_down: str | None) -> tuple[str, str | None]:
    if store_down is not None:
        if b.health == "up":
            return SHARED_STATE, "server answers; requests that need the store get 503 + Retry-After until it is back"
        return SHARED_STATE, "server not answering either; its host's state is unknown while the store is away"
    agent_alive = host is not None and host.state != "lost"
    proc = next((p for p in host.processes if p.name == b.name), None) if host else None
    if b.health == "up":
        if host is not None and not agent_alive:
            return "agent fault", f"server answers but agent {host.name} is silent"
        return "ok", None
    if host is None:
        return "software fault", "server not answering; no agent on its host to tell more"
    if not agent_alive:
        return "host or network down", f"server and agent {host.name} both silent"
    if proc is not None and proc.state in ("starting", "backoff"):
        return "starting", f"agent {host.name} is restarting it ({proc.last_exit or proc.state})"
    detail = f"agent {host.name} alive; server not answering"
    if proc is not None:
        detail += f"; process {proc.state}" + (f", last exit: {proc.last_exit}" if proc.last_exit else "")
    return "software fault", detail

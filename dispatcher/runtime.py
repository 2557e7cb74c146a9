"""One dispatcher process's moving parts and the loops that keep them in step with Redis."""

from __future__ import annotations

import asyncio
import logging
import os

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ctops.auth import TokenBook
from ctops.config import Deployment, DispatcherSpec
from ctops.keys import Keys
from ctops.wire import ClusterState, DispatcherView, HostView, ServerView
from dispatcher.health import HealthChecker
from dispatcher.lease import Lease
from dispatcher.pool import Backend, ServerPool, now_ms
from dispatcher.store import Store

log = logging.getLogger("ctops.dispatcher")


class Runtime:
    def __init__(self, dep: Deployment, spec: DispatcherSpec, redis: Redis) -> None:
        self.dep, self.spec, self.redis = dep, spec, redis
        self.keys = Keys(dep.redis.prefix)
        self.store = Store(redis, self.keys)
        self.tokens = TokenBook(dep)
        self.pool = ServerPool(dep.servers, initial_health="down")
        self.known_hosts = frozenset(a.name for a in dep.agents)
        t = dep.timings
        self.lease = Lease(redis, self.keys, spec.name, t.lease_ttl_ms, t.lease_renew_ms)
        self.health = HealthChecker(self.pool, t.health_interval_ms / 1000, t.health_timeout_ms / 1000,
                                    t.fall, t.rise, on_round=self._health_round_done)
        self._publish_pending = False
        self.started_ms = now_ms()
        self.pool.listeners.append(self._on_state_change)

    # --- state changes -------------------------------------------------------------------------
    def _on_state_change(self, b: Backend, old: str, new: str, reason: str) -> None:
        log.warning("server %s: %s -> %s (%s)", b.name, old, new, reason)
        self._publish_pending = True

    def _health_round_done(self) -> None:
        # only the leader publishes health to Redis; standbys keep their own view for routing
        if self.lease.still_valid():
            asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        try:
            await self.store.publish_servers(list(self.pool), self.spec.name)
            self._publish_pending = False
        except (RedisError, OSError) as exc:
            log.warning("cannot publish server health: %s", exc)

    async def sync_admin_once(self) -> None:
        admin = await self.store.read_admin(list(self.pool.backends))
        for name, state in admin.items():
            b = self.pool.get(name)
            if b is not None and b.admin != state:
                self.pool.set_admin(b, state, "staff action")

    async def sync_loop(self) -> None:
        """Staff actions taken through any dispatcher reach this one within one tick."""
        while True:
            try:
                await self.sync_admin_once()
                await self.store.announce(self.spec.name, {
                    "ops_url": self.spec.ops_url, "data_url": self.spec.data_url, "pid": os.getpid(),
                    "role": "leader" if self.lease.still_valid() else "standby",
                    "epoch": self.lease.epoch, "seen_ms": now_ms(),
                }, ttl_ms=max(5000, self.dep.timings.lease_ttl_ms * 5))
            except (RedisError, OSError) as exc:
                log.warning("sync with Redis failed: %s", exc)
            await asyncio.sleep(0.25)

    async def restore_from_redis(self) -> None:
        """A restarted dispatcher starts from the state the cluster already knows."""
        try:
            await self.sync_admin_once()
        except (RedisError, OSError) as exc:
            log.warning("cannot read state from Redis at start: %s", exc)

    # --- views ---------------------------------------------------------------------------------
    async def cluster_state(self) -> ClusterState:
        dep, now = self.dep, now_ms()
        hb_timeout = dep.timings.heartbeat_timeout_ms
        late_after = dep.timings.heartbeat_interval_ms * 2
        host_names = [a.name for a in dep.agents]
        hosts_raw = await self.store.read_hosts(host_names)
        disp_raw = await self.store.read_dispatchers([d.name for d in dep.dispatchers])

        hosts: list[HostView] = []
        by_host: dict[str, HostView] = {}
        for name in host_names:
            hb, received = hosts_raw[name]
            age = now - received if received else None
            state = "lost" if age is None or age > hb_timeout else ("late" if age > late_after else "alive")
            hv = HostView(name=name, state=state, heartbeat_age_ms=age, seq=hb.seq if hb else None,
                          metrics=hb.metrics if hb else None, processes=hb.processes if hb else [])
            hosts.append(hv)
            by_host[name] = hv

        servers = []
        for b in self.pool:
            hv = by_host.get(b.server_host)
            servers.append(ServerView(
                name=b.name, url=b.url, host=b.server_host, state=b.state, admin=b.admin,
                health=b.health, active_sessions=b.active_sessions, weight=b.weight,  # type: ignore[arg-type]
                last_check_ms=b.last_check_ms, last_error=b.last_error, since_ms=b.since_ms,
                heartbeat_age_ms=hv.heartbeat_age_ms if hv else None,
                cpu_percent=hv.metrics.cpu_percent if hv and hv.metrics else None,
                memory_percent=hv.metrics.memory_percent if hv and hv.metrics else None,
            ))

        leader = self.spec.name if self.lease.still_valid() else self.lease.leader_name
        dispatchers = []
        stale_after = max(3000, dep.timings.lease_ttl_ms * 3)
        for d in dep.dispatchers:
            raw = disp_raw.get(d.name) or {}
            seen = int(raw["seen_ms"]) if raw.get("seen_ms") else None
            me = d.name == self.spec.name
            healthy = me or (seen is not None and now - seen < stale_after)
            role = "leader" if d.name == leader else ("standby" if healthy else "unknown")
            dispatchers.append(DispatcherView(
                name=d.name, role=role, healthy=healthy, ops_url=d.ops_url, data_url=d.data_url,  # type: ignore[arg-type]
                epoch=self.lease.epoch if me else (int(raw["epoch"]) if raw.get("epoch") else None),
                last_seen_ms=now if me else seen))
        return ClusterState(cluster=dep.cluster, leader=leader, served_by=self.spec.name, now_ms=now,
                            dispatchers=dispatchers, servers=servers, hosts=hosts)

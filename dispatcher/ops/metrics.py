"""`GET /metrics` on the ops port: the dispatcher's view of the cluster for Prometheus.

Nothing is counted for it: at scrape time a custom collector turns the state the dispatcher already
keeps (the state view behind `/api/v1/state`, the data plane's counters, the LLM pool, the exception
store's totals) into metric families, so the data plane's hot path pays nothing between scrapes.

Names follow HAProxy's exporter where the meaning is the same (`ctops_server_status{state}`,
`ctops_server_check_status`, `ctops_server_weight`, `ctops_backend_active_servers`,
`ctops_backend_retry_warnings_total`...), with the `ctops_` prefix. A server's state is one series per
possible value, 1 for the current one (HAProxy's convention). Hosts and processes come by the
thousand and a scrape's cost is its number of series, so per host there is the age of its last
heartbeat, and a state series only while it is not alive; per process a series only while it is not
running; counts by state cover the rest (each agent's own port has all of its processes).
Labels take values only from the deployment (server, host, process, provider, store node names) or
from closed sets (states, the proxy's own status codes and failure reasons), so the number of series
is bounded by the deployment's size.

Every dispatcher answers with its own view (its health checks, its lease, its pool); the alert rules
and the dashboard (deploy/) aggregate across instances where one view would do.
"""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from ctops import __version__
from ctops.auth import Principal
from ctops.capture.wire import ExceptionStats
from ctops.opsapi import METRICS_PATH
from ctops.wire import (
    BreakerState,
    ClusterState,
    HostState,
    LLMPoolView,
    LLMProviderState,
    ProcessState,
    ServerState,
    StoreNodeState,
)
from dispatcher.ops.auth import Auth

STATS_TIMEOUT_S = 0.5  # as the state view's own reads (dispatcher.runtime.STATE_READ_TIMEOUT_S)
SERVER_STATES: tuple[str, ...] = get_args(ServerState)
CHECK_STATES = ("up", "suspect", "down")
HOST_STATES: tuple[str, ...] = get_args(HostState)
PROCESS_STATES: tuple[str, ...] = get_args(ProcessState)
PROVIDER_STATES: tuple[str, ...] = get_args(LLMProviderState)
BREAKER_STATES: tuple[str, ...] = get_args(BreakerState)
NODE_STATES: tuple[str, ...] = get_args(StoreNodeState)


@dataclass
class Snapshot:
    """What one scrape reads, gathered (awaiting the store where needed) before it is rendered."""

    dispatcher: str
    state: ClusterState
    llm: LLMPoolView | None = None
    exceptions: ExceptionStats | None = None
    exceptions_ingested: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sources:
    """Where a scrape reads from; the composition root hands these in (the ops routers import none of
    the parts they come from)."""

    dispatcher: str
    cluster_state: Callable[[dict | None], Awaitable[ClusterState]]
    proxy_counters: Callable[[], dict] | None = None
    llm_view: Callable[[], LLMPoolView] | None = None
    exception_stats: Callable[[], Awaitable[ExceptionStats]] | None = None
    exceptions_ingested: Callable[[], int] | None = None

    async def snapshot(self) -> Snapshot:
        state = await self.cluster_state(self.proxy_counters() if self.proxy_counters is not None else None)
        stats = None
        if self.exception_stats is not None and (state.store is None or state.store.available):
            try:
                stats = await asyncio.wait_for(self.exception_stats(), STATS_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError):
                stats = None  # the store is away: ctops_store_up says so, the rest of the scrape stands
        return Snapshot(self.dispatcher, state, self.llm_view() if self.llm_view is not None else None, stats,
                        self.exceptions_ingested() if self.exceptions_ingested is not None else None)


def _secs(ms: int | float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _states(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], str]],
            states: tuple[str, ...]) -> GaugeMetricFamily:
    """One series per (row, possible state): 1 for the row's current state, 0 for the others."""
    g = GaugeMetricFamily(name, doc, labels=[*labels, "state"])
    for values, current in rows:
        for s in states:
            g.add_metric([*values, s], 1.0 if s == current else 0.0)
    return g


def cluster_families(snap: Snapshot) -> Iterator[Metric]:
    st, me = snap.state, snap.dispatcher
    build = st.data_plane or {}
    info = GaugeMetricFamily("ctops_build_info", "ctops version and the data plane this dispatcher runs",
                             labels=["version", "data_plane"])
    info.add_metric([__version__, str(build.get("kind", "unknown"))], 1)
    yield info

    # --- leadership -------------------------------------------------------------------------------
    mine = next((d for d in st.dispatchers if d.name == me), None)
    leads = GaugeMetricFamily("ctops_dispatcher_is_leader", "1 if this dispatcher holds the leadership lease",
                              labels=["dispatcher"])
    leads.add_metric([me], 1.0 if st.leader == me else 0.0)
    yield leads
    known = GaugeMetricFamily("ctops_leader_known", "1 if this dispatcher knows a leader (itself or a peer)")
    known.add_metric([], 1.0 if st.leader else 0.0)
    yield known
    # every family is declared on every scrape, with samples only where there is a value: a rule or
    # a panel over a family that has none yet is not an error, and a test can check the names
    epoch = GaugeMetricFamily("ctops_dispatcher_epoch", "the lease epoch this dispatcher last saw; it rises by "
                              "one per leadership change", labels=["dispatcher"])
    age = GaugeMetricFamily("ctops_dispatcher_lease_age_seconds", "since the leader last renewed the lease",
                            labels=["dispatcher"])
    peer = GaugeMetricFamily("ctops_dispatcher_peer_heartbeat_age_seconds",
                             "since this dispatcher last heard a peer directly", labels=["dispatcher"])
    if mine is not None:
        epoch.add_metric([me], float(mine.epoch or 0))
        if mine.lease_age_ms is not None:
            age.add_metric([me], mine.lease_age_ms / 1000)
        if mine.peer_heartbeat_age_ms is not None:
            peer.add_metric([me], mine.peer_heartbeat_age_ms / 1000)
    yield from (epoch, age, peer)
    peers = GaugeMetricFamily("ctops_peer_up", "1 if this dispatcher sees the named dispatcher as healthy",
                              labels=["peer"])
    for d in st.dispatchers:
        peers.add_metric([d.name], 1.0 if d.healthy else 0.0)
    yield peers

    # --- servers (HAProxy: haproxy_server_*, haproxy_backend_*) ----------------------------------
    yield _states("ctops_server_status", "server state as this dispatcher routes by it (1 for the current "
                  "state; draining/disabled are staff's)", ["server"], (([s.name], s.state) for s in st.servers),
                  SERVER_STATES)
    yield _states("ctops_server_check_status", "result of this dispatcher's health checks", ["server"],
                  (([s.name], s.health) for s in st.servers), CHECK_STATES)
    weight = GaugeMetricFamily("ctops_server_weight", "configured balancing weight", labels=["server"])
    sessions = GaugeMetricFamily("ctops_server_current_sessions", "learner sessions stuck to the server",
                                 labels=["server"])
    for s in st.servers:
        weight.add_metric([s.name], float(s.weight))
        sessions.add_metric([s.name], float(s.active_sessions))
    yield weight
    yield sessions
    active = GaugeMetricFamily("ctops_backend_active_servers", "servers taking new work (up and enabled)")
    active.add_metric([], float(sum(1 for s in st.servers if s.state == "up")))
    yield active
    backup = GaugeMetricFamily("ctops_backend_backup_servers", "ctops has no backup servers: always 0, kept so "
                               "HAProxy dashboards carry over")
    backup.add_metric([], 0.0)
    yield backup

    # --- data plane (the proxy's own counters since it started) ----------------------------------
    if st.proxy is not None:
        yield from _proxy_families(st.proxy)

    # --- hosts and their supervised processes (from the agents' heartbeats; see the docstring) ---
    hb_age = GaugeMetricFamily("ctops_host_heartbeat_age_seconds", "since the host's agent last heartbeat was "
                               "stored (absent: never heard)", labels=["host"])
    host_state = GaugeMetricFamily("ctops_host_state", "hosts not alive: late or lost, by the age of their last "
                                   "heartbeat (alive ones: ctops_hosts)", labels=["host", "state"])
    troubled = GaugeMetricFamily("ctops_process_state", "supervised processes not running, per their agent's "
                                 "last heartbeat (running ones: ctops_processes)", labels=["host", "process", "state"])
    by_state = dict.fromkeys(PROCESS_STATES, 0)
    hosts_by_state = dict.fromkeys(HOST_STATES, 0)
    for h in st.hosts:
        hosts_by_state[h.state] = hosts_by_state.get(h.state, 0) + 1
        if h.state != "alive":
            host_state.add_metric([h.name, h.state], 1.0)
        if h.heartbeat_age_ms is not None:
            hb_age.add_metric([h.name], h.heartbeat_age_ms / 1000)
        for p in h.processes:
            by_state[p.state] = by_state.get(p.state, 0) + 1
            if p.state != "running":
                troubled.add_metric([h.name, p.name, p.state], 1.0)
    counts = GaugeMetricFamily("ctops_hosts", "hosts by state", labels=["state"])
    for state, n in hosts_by_state.items():
        counts.add_metric([state], float(n))
    procs = GaugeMetricFamily("ctops_processes", "supervised processes by state, across hosts", labels=["state"])
    for state, n in by_state.items():
        procs.add_metric([state], float(n))
    yield from (counts, host_state, hb_age, procs, troubled)

    # --- the shared store --------------------------------------------------------------------------
    if st.store is not None:
        yield from _store_families(st)
    rejected = CounterMetricFamily("ctops_rejected_records", "records or inputs refused as damaged or invalid, "
                                   "by source", labels=["source"])
    for source, n in sorted(st.rejected.items()):
        rejected.add_metric([source], float(n))
    yield rejected

    if snap.llm is not None:
        yield from _llm_families(snap.llm)
    yield from _exception_families(snap)


def _proxy_families(c: dict[str, Any]) -> Iterator[Metric]:
    def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=float(c.get(key) or 0))

    yield counter("ctops_frontend_http_requests", "requests the data port received", "requests")
    yield counter("ctops_frontend_http_responses", "responses the data port sent (any status)", "responses")
    conns = GaugeMetricFamily("ctops_frontend_current_connections", "client connections open on the data port")
    conns.add_metric([], float(c.get("client_connections") or 0))
    yield conns
    errors = CounterMetricFamily("ctops_frontend_http_errors", "answers the data plane made itself (no server "
                                 "answered), by status code", labels=["code"])
    for code, n in (c.get("errors_by_status") or {}).items():
        errors.add_metric([str(code)], float(n))
    yield errors
    failures = CounterMetricFamily("ctops_frontend_failures", "why the data plane gave up on a request",
                                   labels=["reason"])
    for reason, n in (c.get("errors_by_kind") or {}).items():
        failures.add_metric([str(reason)], float(n))
    yield failures
    yield counter("ctops_backend_retry_warnings", "tries sent again to the same server", "retries")
    yield counter("ctops_backend_redispatch_warnings", "tries moved to another server", "redispatches")
    yield counter("ctops_backend_first_byte_timeouts", "requests that waited too long for an answer's first byte",
                  "first_byte_timeouts")
    yield counter("ctops_backend_probe_failures", "servers found hung by a probe after a first-byte timeout",
                  "probes_failed")


def _store_families(st: ClusterState) -> Iterator[Metric]:
    s = st.store
    assert s is not None
    up = GaugeMetricFamily("ctops_store_up", "1 if the store's primary answered this dispatcher's last probe")
    up.add_metric([], 1.0 if s.available else 0.0)
    yield up
    primary = GaugeMetricFamily("ctops_store_primary", "1 for the node this dispatcher believes is primary",
                                labels=["node"])
    if s.primary:
        primary.add_metric([s.primary], 1.0)
    yield primary
    yield _states("ctops_store_replica_state", "each replica as this dispatcher sees it", ["node"],
                  (([r.name], r.state) for r in s.replicas), NODE_STATES)
    lag = GaugeMetricFamily("ctops_store_replica_lag_seconds", "since the replica last acknowledged the primary",
                            labels=["node"])
    for r in s.replicas:
        if r.lag_ms is not None:
            lag.add_metric([r.name], r.lag_ms / 1000)
    yield lag
    yield _states("ctops_store_sentinel_state", "each Sentinel as this dispatcher sees it", ["node"],
                  (([n.name], n.state) for n in s.sentinels), NODE_STATES)
    last = GaugeMetricFamily("ctops_store_last_failover_timestamp_seconds",
                             "when this dispatcher last saw the primary change (Unix time)")
    if s.last_failover_ms is not None:
        last.add_metric([], s.last_failover_ms / 1000)
    yield last
    moving = GaugeMetricFamily("ctops_store_failover_in_progress", "1 while the Sentinels move the primary")
    moving.add_metric([], 1.0 if s.failover_in_progress else 0.0)
    yield moving
    yield CounterMetricFamily("ctops_store_writes_unconfirmed", "writes whose wait for a replica timed out "
                              "(cluster-wide)", value=float(s.writes_unconfirmed))
    yield CounterMetricFamily("ctops_store_corrupt_records", "damaged records found (cluster-wide)",
                              value=float(s.corrupt_found))
    yield CounterMetricFamily("ctops_store_repaired_records", "damaged records repaired from an intact copy",
                              value=float(s.repaired))
    scrub = GaugeMetricFamily("ctops_store_last_scrub_duration_seconds", "how long the last full check of "
                              "every record took")
    if s.last_scrub_ms is not None:
        scrub.add_metric([], s.last_scrub_ms / 1000)
    yield scrub


def _llm_families(pool: LLMPoolView) -> Iterator[Metric]:
    ps = pool.providers
    yield _states("ctops_llm_provider_state", "each LLM provider as this dispatcher's pool judges it",
                  ["provider"], (([p.name], p.state) for p in ps), PROVIDER_STATES)
    yield _states("ctops_llm_provider_breaker", "each provider's circuit breaker", ["provider"],
                  (([p.name], p.breaker) for p in ps), BREAKER_STATES)
    reqs = CounterMetricFamily("ctops_llm_provider_requests", "tries sent (hedges and probes excluded)",
                               labels=["provider"])
    fails = CounterMetricFamily("ctops_llm_provider_failures", "tries that failed", labels=["provider"])
    limited = CounterMetricFamily("ctops_llm_provider_rate_limited", "429 answers", labels=["provider"])
    inflight = GaugeMetricFamily("ctops_llm_provider_inflight", "tries in flight", labels=["provider"])
    latency = GaugeMetricFamily("ctops_llm_provider_latency_seconds", "latency to a committed answer over the "
                                "recent tries", labels=["provider", "quantile"])
    health = GaugeMetricFamily("ctops_llm_provider_health_latency_seconds", "latency of the last health check",
                               labels=["provider"])
    for p in ps:
        reqs.add_metric([p.name], float(p.requests))
        fails.add_metric([p.name], float(p.failures))
        limited.add_metric([p.name], float(p.rate_limited))
        inflight.add_metric([p.name], float(p.inflight))
        for q, v in (("0.5", p.p50_ms), ("0.99", p.p99_ms)):
            if v is not None:
                latency.add_metric([p.name, q], v / 1000)
        if p.health_latency_ms is not None:
            health.add_metric([p.name], p.health_latency_ms / 1000)
    yield from (reqs, fails, limited, inflight, latency, health)
    usable = GaugeMetricFamily("ctops_llm_providers_usable", "providers that take requests now (up or degraded)")
    usable.add_metric([], float(sum(1 for p in ps if p.state in ("up", "degraded"))))
    yield usable


def _exception_families(snap: Snapshot) -> Iterator[Metric]:
    if snap.exceptions_ingested is not None:
        yield CounterMetricFamily("ctops_exceptions_ingested", "exception events this dispatcher stored (new, "
                                  "not duplicates)", value=float(snap.exceptions_ingested))
    s = snap.exceptions
    if s is None:
        return
    groups = GaugeMetricFamily("ctops_exceptions_groups", "exception groups kept (cluster-wide)")
    groups.add_metric([], float(s.groups))
    yield groups
    events = GaugeMetricFamily("ctops_exceptions_stream_events", "events in the capped stream (cluster-wide)")
    events.add_metric([], float(s.events))
    yield events
    lost = CounterMetricFamily("ctops_exceptions_lost", "events senders report they could not deliver, by why",
                               labels=["reason"])
    for reason in ("dropped", "corrupt", "rejected"):
        lost.add_metric([reason], float(getattr(s, reason)))
    yield lost


class SnapshotCollector(Collector):
    """One scrape's families, from the snapshot gathered for it (`collect` must be synchronous)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return cluster_families(self.snapshot)


def render(snapshot: Snapshot, accept: str) -> tuple[bytes, str]:
    """The exposition of one snapshot, with the process's own metrics (process_*: CPU, memory, open
    files, start time), as every exporter has them. A registry per scrape: scrapes never share state."""
    encoder, content_type = choose_encoder(accept)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    ProcessCollector(registry=registry)
    return encoder(registry), content_type


def metrics_router(auth: Auth, sources: Sources) -> APIRouter:
    router = APIRouter()

    @router.get(METRICS_PATH, response_class=Response, summary="Prometheus metrics (text exposition format)",
                responses={200: {"content": {"text/plain": {}}}})
    async def metrics(request: Request, _: Annotated[Principal, Depends(auth.require("metrics"))]) -> Response:
        snap = await sources.snapshot()
        # rendered on a worker thread: thousands of series take tens of ms of CPU, which in one piece
        # on the event loop would stall the data plane that shares it; from a thread the interpreter
        # hands the loop its turn every few ms (sys.getswitchinterval) meanwhile
        body, content_type = await asyncio.to_thread(render, snap, request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    return router

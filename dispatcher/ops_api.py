"""The ops API (control plane), versioned under /api/v1, with bearer tokens and roles.

The app is assembled here from one router per area (`dispatcher/ops/`), each built with the parts
it needs; the composition root (`dispatcher.main`) hands those parts in. Errors always have the same
JSON shape, {"error": ..., "detail": ...} (`dispatcher/ops/errors.py`).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.types import ASGIApp

from ctops.asgi_limits import BodyLimit
from ctops.auth import TokenBook
from ctops.config import Deployment, DispatcherSpec
from ctops.keys import Keys
from ctops.rejects import REJECTS, source_of
from dispatcher.commands import CommandRelay
from dispatcher.events import EventLog
from dispatcher.exceptions import exceptions_router
from dispatcher.exceptions.store import ExceptionStore
from dispatcher.ingest import HeartbeatFront, HeartbeatWriter
from dispatcher.integrity_routes import integrity_router
from dispatcher.lease import Lease
from dispatcher.llm.pool import LLMPool
from dispatcher.llm.routes import llm_router
from dispatcher.ops.auth import Auth
from dispatcher.ops.cluster import ClusterStateView, cluster_router, heartbeat_ack
from dispatcher.ops.errors import COMMON_RESPONSES, ApiError, install_error_handlers
from dispatcher.ops.events import events_router
from dispatcher.ops.leadership import leadership_router
from dispatcher.ops.metrics import Sources, metrics_router
from dispatcher.ops.processes import processes_router
from dispatcher.ops.servers import servers_router
from dispatcher.peers import Peers
from dispatcher.pool import ServerPool
from dispatcher.store import Store
from dispatcher.store_routes import store_router
from dispatcher.storewatch import StoreWatch

__all__ = ["ApiError", "create_ops_app", "wrap"]


def create_ops_app(dep: Deployment, spec: DispatcherSpec, *, redis: Redis, keys: Keys, tokens: TokenBook,
                   store: Store, pool: ServerPool, lease: Lease, events: EventLog, commands: CommandRelay,
                   peers: Peers, storewatch: StoreWatch, exceptions: ExceptionStore,
                   cluster_state: ClusterStateView, proxy_counters: Callable[[], dict] | None = None,
                   llm: LLMPool | None = None) -> FastAPI:
    app = FastAPI(title="ctops ops API", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None, responses=COMMON_RESPONSES)
    install_error_handlers(app)
    via = spec.name
    auth = Auth(tokens, store.audit, via, dep.limits.auth_failures_per_minute)
    known_hosts = frozenset(a.name for a in dep.agents)
    writer = HeartbeatWriter(store)
    app.include_router(cluster_router(auth, writer, events, lease, peers, dep.dispatchers, known_hosts,
                                      cluster_state, proxy_counters))
    acks: dict[str | None, bytes] = {}

    def ack() -> bytes:
        # the answer changes only with the leader: encoded once per leader, not once per heartbeat
        leader = lease.leader_name
        if leader not in acks:
            acks[leader] = heartbeat_ack(lease, dep.dispatchers).model_dump_json().encode()
        return acks[leader]

    app.add_middleware(HeartbeatFront, tokens=tokens, known_hosts=known_hosts, writer=writer, events=events,
                       ack=ack)
    app.include_router(events_router(auth, store, events, via))
    app.include_router(servers_router(auth, store, pool, via))
    app.include_router(leadership_router(auth, store, lease, dep.dispatchers, dep.timings.lease_ttl_ms, via))
    app.include_router(processes_router(auth, store, commands, dep.agents, via))
    app.include_router(exceptions_router(exceptions, events, store.audit, dep.limits, via, auth.require,
                                         auth.authenticate))
    app.include_router(integrity_router(redis, keys, auth.require, via))
    if llm is not None:
        app.include_router(llm_router(llm, auth.require, store.audit, via))
    app.include_router(store_router(storewatch, auth.require, store.audit, via))
    app.include_router(metrics_router(auth, Sources(
        spec.name, cluster_state, proxy_counters, llm.view if llm is not None else None, exceptions.stats,
        lambda: exceptions.ingested_total)))
    # built once now, before the loop guard runs: built on the first request, it stalls the event
    # loop for ~0.1 s (seconds on a loaded machine), long enough to stall health checks and the lease
    app.openapi()
    return app


def wrap(app: FastAPI, max_body: int) -> ASGIApp:
    return BodyLimit(app, max_body, on_reject=lambda path, _status, why: REJECTS.note(source_of(path), why))

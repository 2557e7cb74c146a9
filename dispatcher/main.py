"""`ctops dispatcher`: data port (reverse proxy), ops API, health checks and the leadership lease.

This is the process's composition root: `build` makes every part and hands each what it needs
(nothing else constructs parts or writes one into another); `serve` starts the servers and loops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import uvloop
from fastapi import FastAPI
from redis.asyncio import Redis

from ctops import config, logs, redisconn, sdnotify
from ctops.auth import TokenBook
from ctops.config import Deployment, DispatcherSpec, split_hostport
from ctops.keys import Keys
from ctops.opsapi import REDIS_BLOCKING_S
from ctops.rejects import REJECTS
from ctops.serving import serve_asgi
from dispatcher.commands import CommandRelay
from dispatcher.events import EventLog
from dispatcher.exceptions.store import ExceptionStore
from dispatcher.health import HealthChecker
from dispatcher.integrity import IntegrityWatch
from dispatcher.lease import Lease
from dispatcher.llm.app import LLMPoolHandle, start_llm_pool
from dispatcher.loopwatch import LoopWatch
from dispatcher.ops_api import create_ops_app, wrap
from dispatcher.peers import Peers
from dispatcher.pool import Backend, ServerPool
from dispatcher.proxy import DataPlane, ProxySettings
from dispatcher.runtime import Runtime
from dispatcher.store import Store
from dispatcher.storewatch import StoreWatch
from dispatcher.webhooks import WebhookDeliverer

log = logging.getLogger("ctops.dispatcher")


def redis_client(dep: Deployment, socket_timeout: float = 1.0) -> Redis:
    # short timeouts: a Redis stall must not stall the loops that decide health and leadership;
    # through Sentinel when configured, so a failover is waited out, not turned into errors
    return redisconn.async_client(dep.redis, "dispatcher", socket_timeout=socket_timeout)


@dataclass(frozen=True)
class Parts:
    """One dispatcher process's parts, as `build` made them; nothing runs yet."""

    dep: Deployment
    spec: DispatcherSpec
    redis: Redis
    redis_blocking: Redis
    keys: Keys
    store: Store
    tokens: TokenBook
    pool: ServerPool
    events: EventLog
    commands: CommandRelay
    lease: Lease
    storewatch: StoreWatch
    peers: Peers
    health: HealthChecker
    runtime: Runtime
    exceptions: ExceptionStore
    integrity: IntegrityWatch
    webhooks: list[WebhookDeliverer]


def build(dep: Deployment, spec: DispatcherSpec, redis: Redis, redis_blocking: Redis) -> Parts:
    """Make the parts and wire them. Some parts report to the runtime, which needs them first: their
    callbacks reach it through `rt` below, and none is called before `serve` starts the loops."""
    t = dep.timings
    keys = Keys(dep.redis.prefix)
    REJECTS.attach(redis, keys)
    store = Store(redis, keys)
    pool = ServerPool(dep.servers, initial_health="down")
    events = EventLog(redis, keys)
    rt: Runtime
    health: HealthChecker
    lease = Lease(redis, keys, spec.name, t.lease_ttl_ms, t.lease_renew_ms,
                  on_change=lambda leader, epoch: rt.on_leadership(leader, epoch),
                  replica_acks=dep.redis.acks_needed, ack_timeout_ms=dep.redis.replica_ack_timeout_ms,
                  hold_off=lambda: storewatch.defer_leadership())
    storewatch = StoreWatch(dep.redis, keys, spec.name, lease.still_valid, emit=lambda ev: rt.emit_store_event(ev),
                            servers_unconfirmed=lambda: sum(health.unconfirmed.values()))
    # the mutual heartbeat has its own credential (role "peer"), never an agent's
    peers = Peers(spec.name, dep.dispatchers, os.environ.get(spec.peer_token_env), t.lease_renew_ms / 1000,
                  lambda: rt.peer_view(),
                  lambda name, epoch: lease.recheck(f"peer {name} claims to lead at epoch {epoch}"),
                  spec.peer_token_env)
    health = HealthChecker(pool, t.health_interval_ms / 1000, t.health_timeout_ms / 1000, t.fall, t.rise,
                           on_round=lambda: rt.health_round_done(), store_reachable=storewatch.steadily_reachable)
    rt = Runtime(dep, spec, redis, keys, store, pool, lease, events, storewatch, peers, health)
    pool.listeners.append(rt.on_server_state_change)
    lim = dep.limits
    return Parts(
        dep=dep, spec=spec, redis=redis, redis_blocking=redis_blocking, keys=keys, store=store,
        tokens=TokenBook(dep), pool=pool, events=events,
        # long polls (agents' command queues, staff waiting on a reply) need the blocking client
        commands=CommandRelay(redis_blocking, keys), lease=lease, storewatch=storewatch, peers=peers,
        health=health, runtime=rt,
        exceptions=ExceptionStore(redis, keys.prefix, lim.exceptions_stream_max, lim.exceptions_max_groups,
                                  lim.exceptions_ttl_s, reader=f"dispatcher:{spec.name}"),
        integrity=IntegrityWatch(redis, keys, lease, events, spec.name, t.scrub_rate, t.scrub_interval_ms / 1000,
                                 scrub_store=dep.redis),
        webhooks=[WebhookDeliverer(redis, keys, w, dep.cluster, lease.still_valid, lease.fenced)
                  for w in dep.webhooks])


def ops_app(p: Parts, plane: DataPlane | None = None, llm: LLMPoolHandle | None = None) -> FastAPI:
    """The ops API over the parts (the data plane and the LLM pool once they run)."""
    return create_ops_app(p.dep, p.spec, redis=p.redis, keys=p.keys, tokens=p.tokens, store=p.store, pool=p.pool,
                          lease=p.lease, events=p.events, commands=p.commands, peers=p.peers,
                          storewatch=p.storewatch, exceptions=p.exceptions, cluster_state=p.runtime.cluster_state,
                          proxy_counters=plane.counters if plane is not None else None,
                          llm=llm.pool if llm is not None else None)


Loop = tuple[str, Callable[[], Coroutine[Any, Any, None]], Callable[[], int], float]


def watched_loops(p: Parts) -> list[Loop]:
    """The loops that decide health and leadership: (name, factory, progress, stall after s). A
    stalled one is restarted and reported by the loop watch."""
    t = p.dep.timings
    return [("health", p.health.run, lambda: p.health.rounds,
             max(3.0, 4 * (t.health_interval_ms + t.health_timeout_ms) / 1000)),
            ("lease", p.lease.run, lambda: p.lease.ticks, max(2.0, 4 * t.lease_renew_ms / 1000)),
            ("sync", p.runtime.sync_loop, lambda: p.runtime.sync_rounds, 5.0),
            ("store", p.storewatch.run, lambda: p.storewatch.rounds, 10.0)]


async def serve(dep: Deployment, spec: DispatcherSpec) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # long polls (agents' command queues, staff waiting on a reply) block for up to 30 s
    p = build(dep, spec, redis_client(dep), redis_client(dep, socket_timeout=REDIS_BLOCKING_S))
    rt = p.runtime
    await rt.restore_from_redis()

    data_host, data_port = split_hostport(spec.data)
    ops_host, ops_port = split_hostport(spec.ops)
    # the LLM pool is an internal server; the data port routes /llm/ to it
    llm = await start_llm_pool(dep, p.redis, p.keys, rt.emit_as_leader, p.lease.still_valid, spec.name)
    plane = DataPlane(p.pool, ProxySettings.from_deployment(dep),
                      routes={b"/llm/": Backend("llm-pool", llm.host, llm.port)})
    data_server = await plane.start(data_host, data_port)
    t = dep.timings
    watch = LoopWatch(rt.loop_restarted, blocked_exit_after=t.loop_blocked_exit_ms / 1000)
    for name, factory, progress, stall_after in watched_loops(p):
        watch.start(name, factory, progress, stall_after=stall_after)
    loops = [asyncio.create_task(c, name=n) for n, c in (
        ("loopwatch", watch.run()), ("peers", p.peers.run()), ("integrity", p.integrity.run()),
        ("sd-watchdog", sdnotify.feed_watchdog()),
        *((f"webhook-{h.spec.name}", h.run()) for h in p.webhooks))]
    ops = asyncio.create_task(serve_asgi(wrap(ops_app(p, plane, llm), dep.limits.ops_body_max_bytes),
                                         ops_host, ops_port, stop))
    log.info("dispatcher %s: data on %s, ops on %s", spec.name, spec.data, spec.ops)
    sdnotify.notify("READY=1")  # systemd (Type=notify): the data port listens, the ops port is starting
    # what start-up made lives as long as the process: out of the cyclic GC's sight, so collections
    # stay short and do not show in the data plane's tail latency
    gc.freeze()
    await asyncio.wait({ops, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    sdnotify.notify("STOPPING=1")
    watch.stop()
    for task in loops:
        task.cancel()
    data_server.close()
    with contextlib.suppress(Exception):
        await llm.stop()
    with contextlib.suppress(Exception):
        await p.lease.release()
    with contextlib.suppress(Exception):
        await ops
    for h in p.webhooks:
        await h.aclose()
    await p.peers.aclose()
    await p.storewatch.aclose()
    await p.redis.aclose()
    await p.redis_blocking.aclose()
    log.info("dispatcher %s stopped", spec.name)


def run(args: argparse.Namespace) -> int:
    dep = config.load(args.config)
    spec = dep.dispatcher(args.name)
    logs.setup(f"dispatcher[{spec.name}]")
    uvloop.run(serve(dep, spec))
    return 0

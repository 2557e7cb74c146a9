"""`ctops dispatcher`: data port (reverse proxy), ops API, health checks and the leadership lease."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal

import uvloop
from redis.asyncio import Redis

from ctops import config, logs, redisconn
from ctops.config import Deployment, DispatcherSpec, split_hostport
from ctops.serving import serve_asgi
from dispatcher.integrity import IntegrityWatch
from dispatcher.llm.app import start_llm_pool
from dispatcher.loopwatch import LoopWatch
from dispatcher.ops_api import create_ops_app, wrap
from dispatcher.pool import Backend
from dispatcher.proxy import ProxySettings, start_data_plane
from dispatcher.runtime import Runtime
from dispatcher.webhooks import WebhookDeliverer

log = logging.getLogger("ctops.dispatcher")


def redis_client(dep: Deployment, socket_timeout: float = 1.0) -> Redis:
    # short timeouts: a Redis stall must not stall the loops that decide health and leadership;
    # through Sentinel when configured, so a failover is waited out, not turned into errors
    return redisconn.async_client(dep.redis, "dispatcher", socket_timeout=socket_timeout)


async def serve(dep: Deployment, spec: DispatcherSpec) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    redis = redis_client(dep)
    # long polls (agents' command queues, staff waiting on a reply) block for up to 30 s
    redis_blocking = redis_client(dep, socket_timeout=40.0)
    rt = Runtime(dep, spec, redis, redis_blocking)
    await rt.restore_from_redis()

    data_host, data_port = split_hostport(spec.data)
    ops_host, ops_port = split_hostport(spec.ops)
    # the LLM pool is an internal server; the data port routes /llm/ to it
    llm = await start_llm_pool(dep, redis, rt.keys, rt.emit_as_leader, rt.lease.still_valid, spec.name)
    rt.llm = llm.pool
    llm_backend = Backend("llm-pool", llm.host, llm.port)
    data_server = await start_data_plane(rt.pool, data_host, data_port, ProxySettings.from_deployment(dep),
                                         routes={b"/llm/": llm_backend})
    hooks = [WebhookDeliverer(redis, rt.keys, w, dep.cluster, rt.lease.still_valid, rt.lease.fenced)
             for w in dep.webhooks]
    t = dep.timings
    # the loops that decide health and leadership are watched: a stalled one is restarted and reported
    watch = LoopWatch(rt.loop_restarted, blocked_exit_after=t.loop_blocked_exit_ms / 1000)
    watch.start("health", rt.health.run, lambda: rt.health.rounds,
                stall_after=max(3.0, 4 * (t.health_interval_ms + t.health_timeout_ms) / 1000))
    watch.start("lease", rt.lease.run, lambda: rt.lease.ticks, stall_after=max(2.0, 4 * t.lease_renew_ms / 1000))
    watch.start("sync", rt.sync_loop, lambda: rt.sync_rounds, stall_after=5.0)
    watch.start("store", rt.storewatch.run, lambda: rt.storewatch.rounds, stall_after=10.0)
    if os.environ.get("CTOPS_TEST_HOOKS") == "1":
        loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(rt.health, "stall_for_test", True))
    loops = [asyncio.create_task(c, name=n) for n, c in (
        ("loopwatch", watch.run()), ("peers", rt.peers.run()),
        ("integrity", IntegrityWatch(redis, rt.keys, rt.lease, rt.events, spec.name, t.scrub_rate,
                                     t.scrub_interval_ms / 1000, scrub_store=dep.redis).run()),
        *((f"webhook-{h.spec.name}", h.run()) for h in hooks))]
    ops = asyncio.create_task(serve_asgi(wrap(create_ops_app(rt), dep.limits.ops_body_max_bytes),
                                         ops_host, ops_port, stop))
    log.info("dispatcher %s: data on %s, ops on %s", spec.name, spec.data, spec.ops)
    # what start-up made lives as long as the process: out of the cyclic GC's sight, so collections
    # stay short and do not show in the data plane's tail latency
    gc.freeze()
    await asyncio.wait({ops, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    watch.stop()
    for task in loops:
        task.cancel()
    data_server.close()
    with contextlib.suppress(Exception):
        await llm.stop()
    with contextlib.suppress(Exception):
        await rt.lease.release()
    with contextlib.suppress(Exception):
        await ops
    for h in hooks:
        await h.aclose()
    await rt.peers.aclose()
    await rt.storewatch.aclose()
    await redis.aclose()
    await redis_blocking.aclose()
    log.info("dispatcher %s stopped", spec.name)


def run(args: argparse.Namespace) -> int:
    dep = config.load(args.config)
    spec = dep.dispatcher(args.name)
    logs.setup(f"dispatcher[{spec.name}]")
    uvloop.run(serve(dep, spec))
    return 0

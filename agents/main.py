"""`ctops agent`: supervises the host's processes (the watchdog) and sends heartbeats with metrics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

from agents.commands import CommandPoller
from agents.heartbeat import HeartbeatSender
from agents.sdnotify import notify, watchdog_interval
from agents.supervisor import Supervisor
from ctops import config, logs
from ctops.config import ConfigError, Deployment

log = logging.getLogger("ctops.agent")


def _systemd_pinger() -> Callable[[], None] | None:
    interval = watchdog_interval()
    if interval is None:
        return None
    last = 0.0

    def ping() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= interval:
            notify("WATCHDOG=1")
            last = now

    return ping


async def serve(dep: Deployment, name: str, token: str, log_dir: str | None) -> None:
    spec = dep.agent(name)
    urls = spec.dispatchers or [d.ops_url for d in dep.dispatchers]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    sender = HeartbeatSender(name, urls, token, dep.timings.heartbeat_interval_ms / 1000, spec.disk_path,
                             lost_after=dep.timings.heartbeat_timeout_ms / 1000)
    tasks: dict[str, asyncio.Task[None]] = {}

    def start_heartbeats() -> None:
        old = tasks.get("hb")
        if old:
            old.cancel()
        tasks["hb"] = loop.create_task(sender.run(), name="heartbeat")

    sup = Supervisor(spec.processes, log_dir=log_dir, on_event=sender.add_event,
                     restart_loop=lambda: loop.call_soon_threadsafe(start_heartbeats),
                     loop_stall_after=max(5.0, 5 * dep.timings.heartbeat_interval_ms / 1000),
                     systemd_ping=_systemd_pinger())
    sender.supervisor = sup
    sup.start()
    start_heartbeats()
    poller = CommandPoller(name, urls, token, sup, lambda: sender.current)
    tasks["commands"] = loop.create_task(poller.run(), name="commands")
    tail = None
    if spec.log_files:
        from agents import logtail  # only agents that tail logs load it

        tail = logtail.start(name, spec.log_files, urls, token, log_dir)
        tasks["logtail"] = loop.create_task(tail.run(), name="logtail")
    if spec.metrics_listen:
        from agents import exporter  # only agents with a metrics port load prometheus_client

        exporter.start(name, spec.metrics_listen, exporter.AgentCollector(
            name, sup.snapshot, spec.disk_path,
            lambda: {"made": sender.seq, "failures_in_row": sender.backoff.failures,
                     "events_dropped": sender.dropped_events}))
    notify("READY=1")
    log.info("agent %s: supervising %d processes, heartbeats to %s", name, len(sup.items), urls)
    await stop.wait()
    notify("STOPPING=1")
    for t in tasks.values():
        t.cancel()
    await loop.run_in_executor(None, sup.stop)
    await sender.aclose()
    await poller.aclose()
    if tail is not None:
        tail.close()
        await loop.run_in_executor(None, tail.forwarder.close)
    log.info("agent %s stopped", name)


def run(args: argparse.Namespace) -> int:
    dep = config.load(args.config)
    spec = dep.agent(args.name)
    token = os.environ.get(spec.token_env, "")
    if not token:
        raise ConfigError(f"{args.config}: setting agents({spec.name}).token_env: environment variable "
                          f"{spec.token_env} is not set (the agent's bearer token)")
    logs.setup(f"agent[{spec.name}]")
    asyncio.run(serve(dep, args.name, token, os.environ.get("CTOPS_LOG_DIR")))
    return 0

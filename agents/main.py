"""`ctops agent`: supervises the host's processes and sends heartbeats with metrics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from agents.heartbeat import HeartbeatSender
from agents.supervisor import Supervisor
from ctops import config, logs
from ctops.config import ConfigError, Deployment

log = logging.getLogger("ctops.agent")


async def serve(dep: Deployment, name: str, token: str, log_dir: str | None) -> None:
    spec = dep.agent(name)
    urls = spec.dispatchers or [d.ops_url for d in dep.dispatchers]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sup = Supervisor(spec.processes, log_dir=log_dir)
    sup.start()
    sender = HeartbeatSender(name, urls, token, sup, dep.timings.heartbeat_interval_ms / 1000, spec.disk_path)
    hb = asyncio.create_task(sender.run(), name="heartbeat")
    log.info("agent %s: supervising %d processes, heartbeats to %s", name, len(sup.items), urls)
    await stop.wait()
    hb.cancel()
    await sup.stop()
    await sender.aclose()
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

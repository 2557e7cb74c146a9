"""`ctops chaos kill|freeze|thaw TARGET`: SIGKILL, SIGSTOP or SIGCONT a demo process by name;
`ctops chaos block TARGET`: stop only its event-loop thread (its main thread), its other threads
running on, as a blocking call on the loop would leave it (see ctops_tools/threadstop.py).

A trainer's pid changes each time its agent restarts it, so for trainers the live pid is asked of
the cluster first and the state file's is the fallback. The store's nodes are targets by name
(`redis-1`, `sentinel-2`) or by their role now, as the Sentinels see it: `redis-primary` (also
plain `redis`) and `redis-replica-N` (the N-th replica in name order) follow failovers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import signal
import sys
import time
from typing import Any

from ctops import redisconn, statefile
from ctops.opsclient import OpsClient, OpsError, Unreachable

SIGNALS = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "thaw": signal.SIGCONT}


async def live_trainer_pid(doc: dict, name: str) -> int | None:
    client = OpsClient(statefile.ops_urls(doc), statefile.token(doc, "viewer"), timeout=1.0)
    try:
        st = await client.state()
    except (Unreachable, OpsError):
        return None
    finally:
        await client.aclose()
    for h in st.hosts:
        for p in h.processes:
            if p.name == name and p.pid:
                return p.pid
    return None


def redis_by_role(doc: dict[str, Any], target: str) -> dict[str, Any]:
    """The node that is `redis-primary` or `redis-replica-N` now, asking the demo's Sentinels."""
    redis = doc.get("redis") or {}
    nodes = {n["url"].removeprefix("redis://").split("/")[0]: n for n in statefile.redis_nodes(doc)
             if isinstance(n.get("url"), str)}
    sentinels = [tuple(n["url"].removeprefix("redis://").rsplit(":", 1)) for n in nodes.values()
                 if n.get("role") == "sentinel"]
    addrs = [(h, int(p)) for h, p in sentinels]
    password = (redis.get("secrets") or {}).get("sentinel")
    service = redis.get("service", "ctops")
    if target in ("redis", "redis-primary"):
        addr = redisconn.primary_address(addrs, password, service)
        if addr is None:
            raise statefile.StateFileError("no Sentinel answered: cannot tell which node is the primary")
        node = nodes.get(f"{addr[0]}:{addr[1]}")
        if node is None:
            raise statefile.StateFileError(f"the Sentinels name {addr[0]}:{addr[1]} as primary, not a demo node")
        return node
    n = int(target.rsplit("-", 1)[1])
    replicas = redisconn.ask_sentinels(addrs, password, lambda s: s.sentinel_slaves(service)) or []
    live = sorted((nodes[a] for r in replicas if not r.get("is_sdown") and (a := f"{r['ip']}:{r['port']}") in nodes),
                  key=lambda node: node["name"])
    if not 1 <= n <= len(live):
        raise statefile.StateFileError(f"there are {len(live)} healthy replicas now; no {target}")
    return live[n - 1]


def thaw_store(doc: dict[str, Any]) -> int:
    """SIGCONT to every Redis node of the demo (a no-op for the running ones)."""
    for node in statefile.redis_nodes(doc):
        if node.get("role") != "sentinel" and isinstance(node.get("pid"), int) and node["pid"] > 1:
            try:
                os.kill(node["pid"], signal.SIGCONT)
            except ProcessLookupError:
                continue
            print(f"thaw {node['name']} (pid {node['pid']}): sent SIGCONT")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "corrupt":
        return importlib.import_module("ctops_tools.corrupt").run(args)
    try:
        doc = statefile.read(args.state_file)
        by_role = statefile.redis_nodes(doc) and re.fullmatch(r"redis|redis-primary|redis-replica-\d+", args.target)
        if by_role and args.action == "thaw":
            # a frozen primary has been replaced by now: "the primary" is another node
            return thaw_store(doc)
        if by_role:
            section, entry = "redis", redis_by_role(doc, args.target)
        else:
            section, entry = statefile.find_process(doc, args.target)
    except statefile.StateFileError as exc:
        print(f"ctops chaos: {exc}", file=sys.stderr)
        return 2
    pid = entry.get("pid")
    if section == "trainers":
        pid = asyncio.run(live_trainer_pid(doc, args.target)) or pid
    if not isinstance(pid, int) or pid <= 1:
        print(f"ctops chaos: no pid known for {args.target}", file=sys.stderr)
        return 2
    if args.action == "block":
        return block(args.target, pid, args.seconds)
    try:
        os.kill(pid, SIGNALS[args.action])
    except ProcessLookupError:
        print(f"ctops chaos: {args.target} (pid {pid}) is not running", file=sys.stderr)
        return 1
    shown = f"{args.target} = {entry['name']}" if section == "redis" and entry.get("name", args.target) != args.target \
        else args.target
    print(f"{args.action} {shown} (pid {pid}): sent {SIGNALS[args.action].name}")
    return 0


def block(target: str, pid: int, seconds: float) -> int:
    """The main thread of `pid` stopped for `seconds` or until the process exits: a dispatcher's loop
    guard should exit it (70) after `loop_blocked_exit_ms`, and its peer lead."""
    from ctops_tools.procs import pid_alive
    from ctops_tools.threadstop import ThreadStopError, stopped_thread

    try:
        with stopped_thread(pid):
            print(f"block {target} (pid {pid}): its event-loop thread is stopped, its other threads run on",
                  flush=True)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and pid_alive(pid):
                time.sleep(0.1)
    except ThreadStopError as exc:
        print(f"ctops chaos: cannot stop a thread of {target}: {exc} (ptrace needs the same user and "
              "kernel.yama.ptrace_scope 0, or root)", file=sys.stderr)
        return 1
    print(f"{target} exited while its event loop was blocked" if not pid_alive(pid)
          else f"block {target}: released after {seconds:g}s")
    return 0

"""`ctops chaos kill|freeze|thaw TARGET`: SIGKILL, SIGSTOP or SIGCONT a demo process by name.

A trainer's pid changes each time its agent restarts it, so for trainers the live pid is asked of
the cluster first and the state file's is the fallback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys

from ctops import statefile
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


def run(args: argparse.Namespace) -> int:
    if args.action == "corrupt":
        return importlib.import_module("ctops.corrupt").run(args)
    try:
        doc = statefile.read(args.state_file)
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
    try:
        os.kill(pid, SIGNALS[args.action])
    except ProcessLookupError:
        print(f"ctops chaos: {args.target} (pid {pid}) is not running", file=sys.stderr)
        return 1
    print(f"{args.action} {args.target} (pid {pid}): sent {SIGNALS[args.action].name}")
    return 0

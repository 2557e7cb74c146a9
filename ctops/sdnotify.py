"""sd_notify without a library: one datagram to $NOTIFY_SOCKET. Every ctops service under systemd
(`Type=notify`, deploy/systemd/) says READY=1 once it serves and feeds the watchdog (WATCHDOG=1) from
its event loop, so a process whose loop is stuck is restarted by systemd; the agent also understands
these datagrams from the processes it supervises (agents/sdnotify.py)."""

from __future__ import annotations

import asyncio
import os
import socket

# what systemd hands a service for these datagrams; a service's children must not inherit them
# (they would speak for it, and systemd with NotifyAccess=main logs each such datagram as refused)
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify(message: str, sock_path: str | None = None) -> bool:
    path = sock_path or os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec, as systemd recommends; None when not under a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def feed_watchdog() -> None:
    """WATCHDOG=1 every half WatchdogSec for as long as the event loop runs tasks; returns at once
    when systemd set no watchdog."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` without systemd's notification variables, for a process this one starts."""
    return {k: v for k, v in env.items() if k not in SYSTEMD_VARS}

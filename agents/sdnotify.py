"""sd_notify without a library: one datagram to $NOTIFY_SOCKET. Used by the agent under systemd
(READY=1, WATCHDOG=1) and understood by the agent for the processes it supervises."""

from __future__ import annotations

import os
import socket


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


class NotifyListener:
    """A datagram socket a supervised process pings (NOTIFY_SOCKET=path, "WATCHDOG=1")."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.last_ping: float | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                return
            if b"WATCHDOG=1" in data or b"READY=1" in data:
                self.last_ping = now

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

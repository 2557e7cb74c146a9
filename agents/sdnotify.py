"""What the agent understands from the processes it supervises: the sd_notify datagrams systemd would
get (READY=1, WATCHDOG=1). Sending them is shared by every service: ctops/sdnotify.py."""

from __future__ import annotations

import os
import socket

from ctops.sdnotify import notify, watchdog_interval

__all__ = ["NotifyListener", "notify", "watchdog_interval"]


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

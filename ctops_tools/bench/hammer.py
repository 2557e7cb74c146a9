"""A client that connects and sends one GET over and over to a loopback port, counting what a
client would notice while the server behind it restarts: answers, refused connections, resets,
timeouts. Used by `ctops bench watchdog` and the watchdog tests. Loopback only, and bounded."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections import Counter

import psutil

LOOPBACK = "127.0.0.1"


def get(port: int, path: str = "/healthz", timeout: float = 5.0) -> str:
    """One connection, one request: "ok" (2xx), "http_error", "refused", "reset" or "timeout"."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(16)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return "refused" if exc.errno == errno.ECONNREFUSED else "reset"
    if not head:
        return "reset"
    return "ok" if head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")) else "http_error"


class Hammer:
    """Runs `get` back to back on a thread until stopped (or `cap` seconds at most)."""

    def __init__(self, port: int, path: str = "/healthz", cap: float = 60.0) -> None:
        self.port, self.path, self.cap = port, path, cap
        self.counts: Counter[str] = Counter()
        self.first_failure: float | None = None
        self.last_failure: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hammer", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.cap
        while not self._stop.is_set() and time.monotonic() < deadline:
            outcome = get(self.port, self.path)
            self.counts[outcome] += 1
            if outcome != "ok":
                now = time.monotonic()
                self.first_failure = self.first_failure or now
                self.last_failure = now
                if outcome == "refused":
                    time.sleep(0.001)  # a closed port answers at once; keep the loop from spinning

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(15)
        return self.counts


def serving_pid(port: int, path: str = "/healthz", timeout: float = 5.0) -> int | None:
    """The pid of the process that answers a request on `port`, whichever of several processes
    sharing the listening socket that is: the request is held back after its first line, while
    the process that accepted the connection is looked up, then completed and must be answered."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\n".encode())
        mine = s.getsockname()[:2]
        pid = None
        deadline = time.monotonic() + timeout
        while pid is None and time.monotonic() < deadline:
            pid = next((c.pid for c in psutil.net_connections("tcp4") if c.pid and c.laddr and c.raddr
                        and c.laddr.port == port and tuple(c.raddr) == mine), None)
            if pid is None:
                time.sleep(0.02)  # still in the backlog: nobody has accepted it yet
        s.sendall(f"Host: {LOOPBACK}:{port}\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(16)
    return pid if head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")) else None

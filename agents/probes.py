"""Liveness probes for supervised processes. Each is blocking with its own timeout and runs on
the watchdog's small probe pool, so a hung process never stalls the watchdog itself."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from ctops.config import LivenessSpec


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    latency_ms: float
    error: str | None = None


def _http(url: str, timeout: float) -> str | None:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                  "User-Agent: ctops-watchdog\r\n\r\n".encode())
        head = s.recv(64)
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return "not an HTTP answer"
    if not parts[1].startswith(b"2"):
        return f"HTTP {parts[1].decode(errors='replace')}"
    return None


def _tcp(port: int, timeout: float) -> str | None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout):
        return None


def _file(path: str, max_age: float) -> str | None:
    age = time.time() - os.stat(path).st_mtime
    return f"heartbeat file is {age:.1f}s old" if age > max_age else None


def probe(spec: LivenessSpec, notify_age: float | None = None) -> ProbeResult:
    timeout = spec.timeout_ms / 1000
    started = time.monotonic()
    try:
        if spec.kind == "http":
            err = _http(spec.url or "", timeout)
        elif spec.kind == "tcp":
            err = _tcp(spec.port or 0, timeout)
        elif spec.kind == "file":
            err = _file(spec.path or "", timeout)
        elif spec.kind == "notify":
            err = None if notify_age is not None and notify_age <= timeout else (
                "no WATCHDOG=1 ping yet" if notify_age is None else f"last ping {notify_age:.1f}s ago")
        else:
            err = None
    except TimeoutError:
        err = f"no answer in {spec.timeout_ms} ms"
    except OSError as exc:
        err = exc.strerror or type(exc).__name__
    return ProbeResult(err is None, (time.monotonic() - started) * 1000, err)

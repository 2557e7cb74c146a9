"""Idle keep-alive connections to trainer servers, kept per backend for the data plane to reuse.

Opening a TCP connection per request would cost more than proxying the request itself, so
finished connections wait here. The pool only keeps books: the proxy decides what is reusable.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class PooledConnection(Protocol):
    backend: object
    transport: asyncio.Transport | None


class UpstreamPool:
    def __init__(self, size: int) -> None:
        self.size = size  # idle connections kept per backend
        self.idle: dict[object, list[PooledConnection]] = {}

    def acquire(self, backend: object) -> PooledConnection | None:
        """The most recently used live connection (the least likely to have timed out), or None."""
        conns = self.idle.get(backend)
        while conns:
            conn = conns.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def release(self, conn: PooledConnection) -> bool:
        """Keep `conn` for reuse; False (and the caller closes it) when the backend's share is full."""
        conns = self.idle.get(conn.backend)
        if conns is None:
            conns = self.idle[conn.backend] = []
        if len(conns) >= self.size:
            return False
        conns.append(conn)
        return True

    def discard(self, conn: PooledConnection) -> None:
        """Forget a connection that closed while idle."""
        conns = self.idle.get(conn.backend)
        if conns and conn in conns:
            conns.remove(conn)

    def count(self, backend: object) -> int:
        return len(self.idle.get(backend, ()))

    def close_all(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()

"""Idle keep-alive connections to trainer servers, kept per backend for the data plane to reuse.

Opening a TCP connection per request would cost more than proxying the request itself, so
finished connections wait here. The proxy decides what is put back (never after `Connection: close`
or a server error); the pool makes sure what it hands out is not one the server closed meanwhile: an
idle connection's socket must have nothing to read, since bytes there are either the server's EOF
(closed, or closing) not yet seen by the event loop, or an answer nobody asked for. Either way it is
dropped, as HAProxy's `http-reuse safe` never reuses a connection it knows is closing. The request
sent on a connection the server closes just after is still retried by the proxy.
"""

from __future__ import annotations

import asyncio
import select
from typing import Protocol


class PooledConnection(Protocol):
    backend: object
    transport: asyncio.Transport | None
    fd: int  # its socket's descriptor, -1 if unknown


class UpstreamPool:
    def __init__(self, size: int) -> None:
        self.size = size  # idle connections kept per backend
        self.idle: dict[object, list[PooledConnection]] = {}
        self._poll = select.poll()  # asks one socket at a time, without blocking, whether it is readable

    def acquire(self, backend: object) -> PooledConnection | None:
        """The most recently used live connection (the least likely to have timed out), or None."""
        conns = self.idle.get(backend)
        while conns:
            conn = conns.pop()
            t = conn.transport
            if t is None or t.is_closing():
                continue
            if conn.fd >= 0 and self._readable(conn.fd):
                t.close()
                continue
            return conn
        return None

    def _readable(self, fd: int) -> bool:
        poll = self._poll
        poll.register(fd, select.POLLIN | select.POLLRDHUP)
        try:
            return bool(poll.poll(0))
        finally:
            poll.unregister(fd)

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

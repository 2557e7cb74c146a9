"""Idle keep-alive connections to trainer servers, kept per backend for the data plane to reuse.

Opening a TCP connection per request would cost more than proxying the request itself, so
finished connections wait here. The proxy decides what is put back (never after `Connection: close`
or a server error); the pool makes sure what it hands out is not one the server closed meanwhile: an
idle connection's socket must have nothing to read, since bytes there are either the server's EOF
(closed, or closing) not yet seen by the event loop, or an answer nobody asked for. Either way it is
dropped, as HAProxy's `http-reuse safe` never reuses a connection it knows is closing. The request
sent on a connection the server closes just after is still retried by the proxy.

The kernel is asked (one poll per reuse, measured at 3-6 us of CPU per request under load, more than
a fifth of the proxy's whole cost per request) only for a connection idle for `CHECK_IDLE_AFTER` or
longer. One reused sooner cannot have been closed by the server's keep-alive timeout (seconds, on
every server in use), and a close for any other reason (the server exiting) that reached the socket
before the event loop's last look at it was seen by the loop then (the transport is closing); what
the check could still catch is a close in the last moments, which may come just after it as well.
Either way the proxy sends the request again.
"""

from __future__ import annotations

import asyncio
import select
from typing import Protocol

# idle at least this long (s): look for an EOF before reuse (see the module's note). Below any server's
# keep-alive timeout; the data plane's clock may be a sweep tick (<= 0.1 s) late, which only checks more
CHECK_IDLE_AFTER = 0.25


class PooledConnection(Protocol):
    # read-only here: the pool only reads it, and a connection's own type is narrower (a Backend)
    @property
    def backend(self) -> object: ...

    transport: asyncio.Transport | None
    fd: int  # its socket's descriptor, -1 if unknown
    idle_since: float  # when it was last released (the data plane's loop clock)


class UpstreamPool:
    def __init__(self, size: int) -> None:
        self.size = size  # idle connections kept per backend
        self.idle: dict[object, list[PooledConnection]] = {}
        self._poll = select.poll()  # asks one socket at a time, without blocking, whether it is readable

    def acquire(self, backend: object, now: float) -> PooledConnection | None:
        """The most recently used live connection (the least likely to have timed out), or None."""
        conns = self.idle.get(backend)
        while conns:
            conn = conns.pop()
            t = conn.transport
            if t is None or t.is_closing():
                continue
            if conn.fd >= 0 and now - conn.idle_since >= CHECK_IDLE_AFTER and self._readable(conn.fd):
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

    def release(self, conn: PooledConnection, now: float) -> bool:
        """Keep `conn` for reuse; False (and the caller closes it) when the backend's share is full."""
        conns = self.idle.get(conn.backend)
        if conns is None:
            conns = self.idle[conn.backend] = []
        if len(conns) >= self.size:
            return False
        conn.idle_since = now
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

"""The idle-connection pool hands out no connection its server closed while it sat idle, when it sat
long enough for a server's keep-alive timeout to have closed it. Real loopback sockets."""

from __future__ import annotations

import select
import socket
from dataclasses import dataclass

from dispatcher.upstream import CHECK_IDLE_AFTER, UpstreamPool


@dataclass
class _Transport:
    """What the pool asks of a connection's transport (the event loop's, in the data plane)."""

    closed: bool = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


@dataclass
class _Conn:
    backend: object
    transport: _Transport
    fd: int
    idle_since: float = 0.0


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    return ours, theirs


def test_a_connection_closed_by_its_server_while_idle_is_not_reused() -> None:
    pool = UpstreamPool(4)
    live_ours, live_theirs = _pair()
    dead_ours, dead_theirs = _pair()
    try:
        live = _Conn("s", _Transport(), live_ours.fileno())
        dead = _Conn("s", _Transport(), dead_ours.fileno())
        assert pool.release(live, 100.0) and pool.release(dead, 100.0)
        dead_theirs.close()  # the server's keep-alive timeout: a FIN the event loop has not seen yet
        assert select.select([dead_ours], [], [], 10)[0]  # the FIN has reached our socket
        later = 100.0 + CHECK_IDLE_AFTER
        # the most recent first: the closed one is dropped (and its transport closed), the live one given
        assert pool.acquire("s", later) is live
        assert dead.transport.closed and pool.count("s") == 0
    finally:
        for s in (live_ours, live_theirs, dead_ours):
            s.close()

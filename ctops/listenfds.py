"""Listening sockets handed down by a supervisor (systemd's socket activation protocol), and the
warm spare's wait for its turn.

A supervisor that owns a server's listening socket passes it as fd 3 with `LISTEN_FDS=1` and
`LISTEN_PID` set to the child's pid; connections then wait in the socket's backlog while the server
restarts instead of being refused. A warm spare is also given `CTOPS_HANDOVER_FD`, a stream socket
to its supervisor: once imported and set up it writes one byte ("ready") and blocks until the
supervisor writes "G" (go), before it accepts anything. So a spare never serves while the active
process is healthy, and takes over the moment it is told. Without these variables a server binds
its own port, as always.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger("ctops.listenfds")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
HANDOVER_FD_ENV = "CTOPS_HANDOVER_FD"
READY, GO = b"R", b"G"

_inherited: list[socket.socket] | None = None


def inherited() -> list[socket.socket]:
    """The sockets passed to this very process (LISTEN_PID must be ours), taken once. The variables
    are removed either way, so that no child (learner code included) takes the sockets for its own."""
    global _inherited
    if _inherited is None:
        pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
        _inherited = []
        if pid == str(os.getpid()) and count.isdigit():
            for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
                try:
                    sock = socket.socket(fileno=fd)  # family and type read from the fd itself
                except OSError as exc:
                    log.warning("inherited fd %d is not a socket (%s); ignored", fd, exc)
                    continue
                sock.set_inheritable(False)
                _inherited.append(sock)
    return _inherited


def _matches(sock: socket.socket, host: str, port: int) -> bool:
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    addr, bound_port = sock.getsockname()[:2]
    if bound_port != port:
        return False
    if addr in ("0.0.0.0", "::") or addr == host.strip("[]"):
        return True
    try:
        return any(info[4][0] == addr for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except OSError:
        return False


def take(host: str, port: int) -> socket.socket | None:
    """The inherited listening socket bound to host:port, or None: then the caller binds its own."""
    socks = inherited()
    for sock in socks:
        if _matches(sock, host, port):
            log.info("serving on the listening socket %s:%d handed down by the supervisor", host, port)
            return sock
    if socks:
        # the supervisor listens on an address this server is not configured for: its clients would
        # wait in a backlog nobody accepts from
        log.warning("inherited sockets %s do not match %s:%d; binding my own",
                    [s.getsockname() for s in socks], host, port)
    return None


def wait_for_handover() -> None:
    """For a warm spare (CTOPS_HANDOVER_FD set): say ready, then block until told to take over.
    A supervisor that goes away (end of file) or discards the spare ends this process."""
    raw = os.environ.pop(HANDOVER_FD_ENV, "")
    if not raw.isdigit():
        return
    with socket.socket(fileno=int(raw)) as ctl:
        try:
            ctl.sendall(READY)
            log.info("warm spare ready (pid %d); waiting for the handover", os.getpid())
        except OSError:
            pass  # told to go before it was ready: the supervisor has closed its end, the word waits
        try:
            word = ctl.recv(1)
        except OSError as exc:
            word = b""
            log.warning("handover channel failed: %s", exc)
    if word != GO:
        log.info("warm spare dismissed before its turn; exiting")
        sys.exit(0)
    log.info("warm spare taking over (pid %d)", os.getpid())

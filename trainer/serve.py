"""Run an ASGI app with uvicorn in the foreground and exit 0 on SIGTERM/SIGINT."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable
from typing import Any

import uvicorn

from ctops import listenfds

PR_SET_DUMPABLE = 4


def harden() -> None:
    """Non-dumpable: a child running as the same uid then cannot read /proc/<our pid>/environ or
    attach to us, whatever a learner's code tries."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def serve(app: Callable[..., Any], host: str, port: int, on_start: Callable[[], object] | None = None) -> int:
    """`on_start` runs once this process is about to serve: for a warm spare, only after its handover
    (what must not run twice at once, such as holding the exception spool, goes there)."""
    config = uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools", log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    sock = listenfds.take(host, port)
    if sock is not None:
        # a warm spare has everything imported and set up before it waits, so that once told to take
        # over it only starts its loop and accepts what queued in the shared backlog meanwhile
        config.load()
        listenfds.wait_for_handover()
    if on_start is not None:
        on_start()
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place
    # that re-raise is a no-op and the process ends with status 0 rather than dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1

"""The one way ctops serves an ASGI app (ops API, LLM pool, trainer, fake LLM provider) with uvicorn.

Two modes, one set of settings (`config`):
- `start` / `serve_asgi`: inside an event loop we own, next to other servers and loops that stop
  together; uvicorn leaves SIGINT/SIGTERM to the caller (the dispatcher).
- `run_foreground`: the process is this one server (trainer, fake LLM); uvicorn handles the signals
  and the process exits 0 after a graceful stop.
Either takes a listening socket handed down by a supervisor (LISTEN_FDS) for its address.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from starlette.types import ASGIApp

from ctops import listenfds, logs, sdnotify

START_TIMEOUT_S = 10.0


def config(app: ASGIApp | Callable[..., Any], host: str, port: int, *, lifespan: Literal["on", "off"] = "off",
           keep_alive_s: int = 30, graceful_s: int | None = 1, **more: Any) -> uvicorn.Config:
    """uvicorn's settings for every ctops server: httptools, no access log, warnings only."""
    if logs.log_format() == "json":
        # uvicorn's own handlers would print its lines as text; without them they reach ours
        more.setdefault("log_config", None)
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, http="httptools",
                          lifespan=lifespan, timeout_keep_alive=keep_alive_s,
                          timeout_graceful_shutdown=graceful_s, **more)


class _InOurLoop(uvicorn.Server):
    """A server sharing its process with others: the process's signal handling stays with the caller."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Foreground(uvicorn.Server):
    """The process is this server: under systemd (Type=notify) it is ready once it accepts, and its
    event loop feeds the watchdog while it runs."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            sdnotify.notify("READY=1")
            self._watchdog = asyncio.create_task(sdnotify.feed_watchdog(), name="sd-watchdog")


@dataclass
class Served:
    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    async def stop(self, grace: float = 5.0) -> None:
        self.server.should_exit = True
        done, _ = await asyncio.wait({self.task}, timeout=grace)
        if not done:
            # a client holding a connection open must not hold up the process's exit
            self.server.force_exit = True
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=grace)


async def start(cfg: uvicorn.Config, sock: socket.socket | None = None, name: str = "http") -> Served:
    """Serve in the running loop; returns once the server accepts. A failed start (port in use) raises."""
    sock = sock or listenfds.take(cfg.host, cfg.port)
    server = _InOurLoop(cfg)
    task = asyncio.create_task(server.serve([sock] if sock else None), name=name)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"{name} server stopped at start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"{name} server did not start within {START_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.01)
    bound = sock.getsockname() if sock else server.servers[0].sockets[0].getsockname()
    return Served(server, task, bound[0], bound[1])


async def serve_asgi(app: ASGIApp, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set (or the server fails)."""
    # agents' long polls would hold a graceful stop for their whole wait; they retry on another dispatcher
    served = await start(config(app, host, port, graceful_s=1))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({served.task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if served.task in done:
        stopper.cancel()
        served.task.result()
        return
    await served.stop()


def run_foreground(app: ASGIApp | Callable[..., Any], host: str, port: int,
                   on_start: Callable[[], object] | None = None) -> int:
    """Serve in the foreground until SIGTERM/SIGINT; 0 after a graceful stop, 1 if it never started.

    `on_start` runs once this process is about to serve: for a warm spare, only after its handover
    (what must not run twice at once, such as holding the exception spool, goes there)."""
    cfg = config(app, host, port, lifespan="on", loop="uvloop", keep_alive_s=5, graceful_s=2)
    server = _Foreground(cfg)
    sock = listenfds.take(host, port)
    if sock is not None:
        # a warm spare has everything imported and set up before it waits, so that once told to take
        # over it only starts its loop and accepts what queued in the shared backlog meanwhile
        cfg.load()
        listenfds.wait_for_handover()
    if on_start is not None:
        on_start()
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place
    # that re-raise is a no-op and the process ends with status 0 rather than dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1

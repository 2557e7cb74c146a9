"""Run an ASGI app with uvicorn inside an event loop we own, stopping when we say so.

uvicorn's own `serve()` takes over SIGINT/SIGTERM; our processes run several servers and loops
in one event loop and stop them together, so the signal handling stays with the caller.
"""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn
from starlette.types import ASGIApp

from ctops import listenfds


async def serve_asgi(app: ASGIApp, host: str, port: int, stop: asyncio.Event) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            http="httptools", lifespan="off", timeout_keep_alive=30,
                            # agents' long polls would hold a graceful stop for their whole wait;
                            # they retry on another dispatcher anyway
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    # a listening socket handed down by a supervisor (LISTEN_FDS) for this address, else our own
    sock = listenfds.take(host, port)
    task = asyncio.create_task(server._serve([sock] if sock else None))  # noqa: SLF001 - serve() installs signal handlers
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        stopper.cancel()
        task.result()  # a failed start (port in use) surfaces here
        return
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)

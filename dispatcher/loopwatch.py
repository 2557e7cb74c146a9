"""Keeps the dispatcher's internal loops (health checks, lease, Redis sync) alive, as the agent's
watchdog keeps its processes alive.

Each loop exposes a progress counter; a loop whose counter has not moved for its stall time is
cancelled, started again and reported. A thread watches the event loop itself: when the loop is
blocked nothing inside it can help, so after `blocked_exit_after` the process exits and its
supervisor (the agent, or systemd) starts it again — a standby has taken over by then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ctops.dispatcher.loopwatch")
EXIT_BLOCKED = 70


@dataclass
class _Watched:
    name: str
    factory: Callable[[], Coroutine[Any, Any, None]]
    progress: Callable[[], int]
    stall_after: float
    task: asyncio.Task[None] | None = None
    last_value: int = -1
    last_change: float = 0.0
    restarts: int = 0


class LoopWatch:
    def __init__(self, on_restart: Callable[[str, float], None], blocked_exit_after: float = 10.0) -> None:
        self.on_restart = on_restart
        self.blocked_exit_after = blocked_exit_after
        self.loops: dict[str, _Watched] = {}
        self.loop_beat = time.monotonic()
        self._stop = threading.Event()

    def start(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]], progress: Callable[[], int],
              stall_after: float) -> None:
        w = _Watched(name, factory, progress, stall_after, last_change=time.monotonic())
        w.task = asyncio.create_task(factory(), name=name)
        self.loops[name] = w

    def tasks(self) -> list[asyncio.Task[None]]:
        return [w.task for w in self.loops.values() if w.task is not None]

    def check(self, now: float) -> None:
        for w in self.loops.values():
            value = w.progress()
            if value != w.last_value:
                w.last_value, w.last_change = value, now
                continue
            if now - w.last_change > w.stall_after:
                stalled = now - w.last_change
                log.error("%s loop made no progress for %.1fs; restarting it", w.name, stalled)
                if w.task is not None:
                    w.task.cancel()
                w.task = asyncio.create_task(w.factory(), name=w.name)
                w.restarts += 1
                w.last_change = now
                self.on_restart(w.name, stalled)

    async def run(self) -> None:
        threading.Thread(target=self._guard, name="loop-guard", daemon=True).start()
        previous = time.monotonic()
        while True:
            now = time.monotonic()
            self.loop_beat = now
            if now - previous > 2.0:
                # the watch overslept with everything else: a frozen or starved process, not a
                # stalled loop; every loop gets a fresh start before it is judged again
                for w in self.loops.values():
                    w.last_change = now
            previous = now
            self.check(now)
            await asyncio.sleep(0.25)

    def _guard(self) -> None:
        last_wake = time.monotonic()
        while not self._stop.wait(0.5):
            now = time.monotonic()
            if now - last_wake > 2.0:
                # this thread overslept too: the whole process was frozen (SIGSTOP), not the loop
                # alone; give the loop a fresh start instead of exiting
                self.loop_beat = now
            last_wake = now
            blocked = now - self.loop_beat
            if blocked > self.blocked_exit_after:
                log.critical("event loop blocked for %.1fs; exiting so the supervisor restarts this dispatcher",
                             blocked)
                logging.shutdown()
                os._exit(EXIT_BLOCKED)

    def stop(self) -> None:
        self._stop.set()
        for w in self.loops.values():
            if w.task is not None:
                w.task.cancel()

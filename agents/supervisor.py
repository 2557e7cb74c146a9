"""Starts the host's processes and starts them again when they exit.

Each child gets its own process group so a stop reaches everything it spawned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from ctops.config import ProcessSpec
from ctops.wire import ProcessState

log = logging.getLogger("ctops.agent.supervisor")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


@dataclass(eq=False)
class Supervised:
    spec: ProcessSpec
    state: ProcessState = "stopped"
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    wanted: bool = True
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None


class Supervisor:
    def __init__(self, specs: list[ProcessSpec], grace: float = 5.0, log_dir: str | None = None) -> None:
        self.items = [Supervised(s) for s in specs]
        self.grace = grace
        self.log_dir = log_dir

    async def _spawn(self, item: Supervised) -> None:
        env = {**os.environ, **item.spec.env}
        out: int | None = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = os.open(os.path.join(self.log_dir, f"{item.spec.name}.log"),
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            item.proc = await asyncio.create_subprocess_exec(
                *item.spec.command, env=env, cwd=item.spec.cwd, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True)
        finally:
            if out is not None:
                os.close(out)
        item.started_at = time.monotonic()
        item.state = "running"
        log.info("started %s (pid %d)", item.spec.name, item.proc.pid)

    async def _keep(self, item: Supervised) -> None:
        delay = 0.0
        while item.wanted:
            try:
                await self._spawn(item)
            except OSError as exc:
                item.state, item.last_exit = "backoff", f"cannot start: {exc}"
                log.error("cannot start %s: %s", item.spec.name, exc)
            else:
                assert item.proc is not None
                code = await item.proc.wait()
                item.last_exit = describe_exit(code)
                if not item.wanted:
                    break
                log.warning("%s %s", item.spec.name, item.last_exit)
                if item.spec.restart == "never" or (item.spec.restart == "on-failure" and code == 0):
                    item.state = "stopped"
                    return
                # a process that ran for a while restarts at once; one that dies at start backs off
                delay = 0.0 if time.monotonic() - item.started_at > 5 else min(max(delay * 2, 0.1), 5.0)
            item.restarts += 1
            item.state = "backoff" if delay else "starting"
            await asyncio.sleep(delay)
        item.state = "stopped"

    def start(self) -> None:
        for item in self.items:
            item.wanted = True
            item._task = asyncio.create_task(self._keep(item), name=f"supervise-{item.spec.name}")

    async def stop(self) -> None:
        for item in self.items:
            item.wanted = False
        await asyncio.gather(*(self._terminate(i) for i in self.items), return_exceptions=True)
        for item in self.items:
            if item._task:
                item._task.cancel()

    async def _terminate(self, item: Supervised) -> None:
        proc = item.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)  # a frozen process would never see the SIGTERM
        try:
            await asyncio.wait_for(proc.wait(), self.grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        item.state = "stopped"

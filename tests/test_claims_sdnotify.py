"""README claim: the agent sends systemd `WATCHDOG=1` only while both watchdog threads (and its
heartbeat loop) are alive. The pings come from the guard thread, and only while the checker beats:
a guard stuck in its ping (as in a `sendto` to a systemd that stopped reading) sends nothing more,
the checker replaces it, and the pings go on from the new guard. (A frozen checker is replaced by the
guard in the same tick that finds it stale, so pings never pause for it: tests/test_watchdog.py shows
the replacement.) Real supervisor threads and a real supervised process; tests/test_sdnotify.py
shows READY=1 and WATCHDOG=1 from a real agent."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from agents.supervisor import Supervisor
from ctops.config import ProcessSpec
from tests.cluster import wait_for


class Pings:
    """The systemd ping as the guard calls it; the n-th call can be made to hang."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.calls: list[tuple[int, int, float]] = []  # (thread id, guard generation, checker beat age)
        self.hang_at: int | None = None
        self.release = threading.Event()

    def __call__(self) -> None:
        self.calls.append((threading.get_ident(), self.sup.guard_generation,
                           time.monotonic() - self.sup.checker_beat))
        if self.hang_at is not None and len(self.calls) == self.hang_at:
            self.release.wait(120)


@pytest.fixture
def sup() -> Iterator[Supervisor]:
    s = Supervisor([ProcessSpec(name="sleeper", command=[sys.executable, "-c", "import time; time.sleep(600)"])],
                   on_event=lambda e: None)
    yield s
    s.stop()


def test_a_guard_stuck_in_its_ping_sends_no_more_and_is_replaced(sup: Supervisor) -> None:
    pings = Pings(sup)
    sup.systemd_ping = pings
    sup.start()
    wait_for("pings", lambda: len(pings.calls) >= 3)
    pings.hang_at = len(pings.calls) + 2
    stuck = wait_for("the guard stuck in a ping", lambda: len(pings.calls) >= pings.hang_at and pings.calls[-1])
    try:
        # the checker sees the silent guard and starts another; pings come from it, never the stuck one
        wait_for("pings from a new guard", lambda: any(t != stuck[0] for t, *_ in pings.calls[pings.hang_at:]), 30)
        after = pings.calls[pings.hang_at:]
        assert all(t != stuck[0] and gen > stuck[1] for t, gen, _ in after), after
        wd = sup.snapshot()[1]
        assert wd.guard_alive and wd.checker_alive
    finally:
        pings.release.set()
    # the old guard, released, never pings again: its generation is over
    n = len(pings.calls)
    wait_for("more pings", lambda: len(pings.calls) >= n + 5)
    assert all(t != stuck[0] for t, *_ in pings.calls[n:])


async def test_pings_stop_while_the_event_loop_is_blocked_and_resume_after() -> None:
    """The heartbeat loop runs on the agent's event loop; with the loop blocked (a sync call on it),
    the guard's restart of the heartbeat loop cannot happen, and asking for it is not the loop
    being alive: no WATCHDOG=1 until the loop beats again, so systemd restarts a hung agent."""
    loop = asyncio.get_running_loop()
    pings: list[float] = []
    restarts: list[float] = []
    stall_after = 1.0

    def restart() -> None:
        restarts.append(time.monotonic())
        loop.call_soon_threadsafe(lambda: None)  # as the agent does: the loop must run it

    s = Supervisor([ProcessSpec(name="sleeper", command=[sys.executable, "-c", "import time; time.sleep(600)"])],
                   on_event=lambda e: None, restart_loop=restart, loop_stall_after=stall_after,
                   systemd_ping=lambda: pings.append(time.monotonic()))

    async def heartbeat_loop() -> None:
        while True:
            s.loop_beat = time.monotonic()
            await asyncio.sleep(0.05)

    beats = asyncio.create_task(heartbeat_loop())
    s.start()
    try:
        for _ in range(600):
            if len(pings) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(pings) >= 3
        # the event loop blocked from here: this test waits without awaiting
        wait_for("the guard to ask twice for the loop to restart", lambda: len(restarts) >= 2, 60)
        blocked = [t for t in pings if t > restarts[0]]
        assert blocked == [], f"{len(blocked)} pings while the loop was blocked"
        assert s.snapshot()[1].loop_restarts >= 2
        n = len(pings)
        await asyncio.sleep(0)  # the loop runs again: the heartbeat loop beats, the pings resume
        for _ in range(600):
            if len(pings) >= n + 3:
                break
            await asyncio.sleep(0.05)
        assert len(pings) >= n + 3
    finally:
        beats.cancel()
        s.stop()

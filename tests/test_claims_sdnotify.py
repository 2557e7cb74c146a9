"""README claim: the agent sends systemd `WATCHDOG=1` only while both watchdog threads (and its
heartbeat loop) are alive. The pings come from the guard thread, and only while the checker beats:
a guard stuck in its ping (as in a `sendto` to a systemd that stopped reading) sends nothing more,
the checker replaces it, and the pings go on from the new guard. (A frozen checker is replaced by the
guard in the same tick that finds it stale, so pings never pause for it: tests/test_watchdog.py shows
the replacement.) Real supervisor threads and a real supervised process; tests/test_sdnotify.py
shows READY=1 and WATCHDOG=1 from a real agent."""

from __future__ import annotations

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

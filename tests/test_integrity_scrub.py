"""The leader's background scrub runs beside the data plane, never inside it: a process of its
own, at the lowest CPU priority, which goes when its dispatcher goes, even in the middle of a pass."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import psutil
import pytest
import redis

from ctops import integrity
from ctops.envelope import seal_fields
from ctops.keys import Keys
from tests.cluster import Cluster, wait_for

RECORDS = 600


def _fill(c: Cluster) -> None:
    keys = Keys(prefix=c.prefix)
    with redis.Redis.from_url(c.redis.url) as r, r.pipeline(transaction=False) as p:
        for i in range(RECORDS):
            key = keys.session(f"f{i}")
            p.hset(key, mapping=seal_fields(key, integrity.SESSION, {"session_id": f"f{i}", "learner": "x"}))
        p.execute()


def _scrub_children(c: Cluster) -> list[psutil.Process]:
    return [p for p in psutil.Process(c.children["A"].pid).children()
            if "spawn_main" in " ".join(p.cmdline())]


def test_the_scrub_runs_in_its_own_process_and_goes_with_its_dispatcher(make_cluster) -> None:  # noqa: ANN001
    # 600 records at 20/s: a pass of 30 s, so the dispatcher dies in the middle of one
    c = make_cluster(timings={"scrub_interval_ms": 300, "scrub_rate": 20})
    _fill(c)
    c.start_all()
    wait_for("a scrub pass to start", lambda: "scrub: pass started" in c.log("A"), 30)
    [scrub] = _scrub_children(c)
    assert scrub.pid != c.children["A"].pid
    # at the host's lowest CPU priority: a learner's request waking anywhere takes the core at once
    assert os.sched_getscheduler(scrub.pid) == os.SCHED_IDLE
    # learners are served through the proxy meanwhile
    with httpx.Client(base_url=c.data_url(), timeout=30) as http:
        sid = http.post("/api/sessions", json={"learner": "ada"}).json()["session_id"]
        assert all(http.get(f"/api/sessions/{sid}").status_code == 200 for _ in range(20))
    assert scrub.is_running() and "records checked" not in c.log("A")  # still in its pass
    c.signal("A", signal.SIGKILL)
    wait_for("the scrub to exit with its dispatcher",
             lambda: not scrub.is_running() or scrub.status() == psutil.STATUS_ZOMBIE, 15)


def test_a_scrub_that_fell_behind_keeps_to_its_rate_instead_of_catching_up_in_a_burst(
        monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)  # time does not pass here: each step's wait is what the pacer asks for

    monkeypatch.setattr(integrity.asyncio, "sleep", record)

    async def walk() -> None:
        pacer = integrity.Pacer(rate=1.0)  # 1 key a second
        pacer.due -= 600  # as if the process had been starved of CPU for ten minutes
        for _ in range(10):
            await pacer.pace(1)

    asyncio.run(walk())
    # the ten minutes owed are not run off unpaced: from the second step on, each waits its turn
    assert len(waits) >= 9 and all(w > 0.5 for w in waits[-9:])

"""Non-stop forwarding against real trainer servers and real signals (issue 3, data-plane side).

Learners (`ctops load`) keep working while servers are killed and frozen; sessions stick to a
server while it is up and move when it is not; a draining server keeps its sessions only.
Nothing here is timed: waits poll for states, with generous limits.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from ctops_tools.load import run_load
from tests.cluster import Cluster, wait_for

# it freezes and kills trainers and waits for the checks to notice
pytestmark = pytest.mark.quick_timings


def _load_in_thread(url: str, concurrency: int, duration: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        out["report"] = asyncio.run(run_load([url], concurrency, duration, timeout=20.0)).as_dict()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def test_load_sees_no_failure_while_servers_are_killed_and_frozen(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    c.start_all()
    t, out = _load_in_thread(c.data_url(), concurrency=6, duration=14.0)
    time.sleep(3)
    c.signal("trainer-1", signal.SIGKILL)
    c.wait_state("trainer-1", "down")
    time.sleep(2)
    c.signal("trainer-2", signal.SIGSTOP)
    try:
        c.wait_state("trainer-2", "down")
        time.sleep(2)
    finally:
        c.signal("trainer-2", signal.SIGCONT)
    c.wait_state("trainer-2", "up")
    t.join(120)
    assert not t.is_alive(), "the load never ended"
    report = out["report"]
    assert report["requests"] > 50, report
    assert report["failed"] == 0, report
    sub = report["submissions"]
    assert sub["completed"] > 0 and sub["duplicates"] == 0 and sub["lost"] == 0, report


def test_all_servers_down_gives_503_with_retry_after(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(trainers=2)
    c.start_all()
    for name in c.server_names:
        c.signal(name, signal.SIGKILL)
    for name in c.server_names:  # whether or not the checks have seen it yet, nothing hangs
        r = httpx.post(f"{c.data_url()}/api/sessions", json={}, headers={"Idempotency-Key": "k-" + name}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "error" in r.json()


def test_session_sticks_to_its_server_and_moves_when_it_dies(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    c.start_all()
    with httpx.Client(base_url=c.data_url(), timeout=20) as learner:
        r = learner.post("/api/sessions", json={"learner": "ada"})
        assert r.status_code == 201
        sid, home = r.json()["session_id"], r.json()["server"]
        assert learner.cookies.get("ctops_srv", "").rsplit(".", 1)[0] == home  # "<server>.<signature>"
        for _ in range(5):
            assert learner.get(f"/api/sessions/{sid}").json()["server"] == home
        c.signal(home, signal.SIGKILL)
        r = learner.get(f"/api/sessions/{sid}")  # the next request moves, nothing lost
        assert r.status_code == 200 and r.json()["session_id"] == sid
        moved = r.json()["server"]
        assert moved != home and learner.cookies.get("ctops_srv", "").rsplit(".", 1)[0] == moved
        for _ in range(5):
            assert learner.get(f"/api/sessions/{sid}").json()["server"] == moved


def test_draining_server_keeps_its_sessions_and_takes_no_new_ones(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    c.start_all()
    with httpx.Client(base_url=c.data_url(), timeout=20) as learner:
        r = learner.post("/api/sessions", json={"learner": "grace"})
        sid, home = r.json()["session_id"], r.json()["server"]
        r = httpx.post(f"{c.ops_url()}/api/v1/servers/{home}/drain", headers=c.auth("operator"), timeout=10)
        assert r.status_code == 200
        wait_for("draining", lambda: c.server(home)["state"] == "draining")
        for _ in range(4):
            assert learner.get(f"/api/sessions/{sid}").json()["server"] == home
        for _ in range(8):  # new learners (no cookie) never land there
            r = httpx.post(f"{c.data_url()}/api/sessions", json={}, timeout=20)
            assert r.status_code == 201 and r.json()["server"] != home


def test_posts_without_keys_to_a_frozen_server_complete_elsewhere_exactly_once(
        make_cluster: Callable[..., Cluster]) -> None:
    """Submissions without an Idempotency-Key in flight to a server that freezes are answered by
    another server while it is still frozen, and none is stored twice once it thaws and reads them."""
    c = make_cluster()
    c.start_all()
    n = 8
    with httpx.Client(base_url=c.data_url(), timeout=30) as learner:
        exercise = learner.get("/api/exercises").json()["exercises"][0]["id"]
        r = learner.post("/api/sessions", json={"learner": "frozen"})
        assert r.status_code == 201
        sid, home = r.json()["session_id"], r.json()["server"]
        cookies = dict(learner.cookies)

    async def submit_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=c.data_url(), timeout=30, cookies=cookies) as a:
            return list(await asyncio.gather(*(
                a.post(f"/api/sessions/{sid}/submissions", json={"exercise_id": exercise, "code": f"# try {i}\n"})
                for i in range(n))))

    c.signal(home, signal.SIGSTOP)  # the session sticks to it: the submissions go there first
    try:
        answers = asyncio.run(submit_all())
        # all answered while the server is still frozen: by another one, none failed
        assert [a.status_code for a in answers] == [202] * n, [a.text for a in answers]
        assert all(a.json()["server"] != home for a in answers)
        ids = {a.json()["submission_id"] for a in answers}
        assert len(ids) == n
    finally:
        c.signal(home, signal.SIGCONT)
    c.wait_state(home, "up")
    # the thawed server now reads the requests it was sent while frozen: they carry the keys the
    # dispatcher gave them, so it replays the stored outcomes instead of storing them again
    time.sleep(3)
    with httpx.Client(base_url=c.data_url(), timeout=30) as learner:
        stored = learner.get(f"/api/sessions/{sid}").json()["submissions"]
    stored_ids = [s["submission_id"] if isinstance(s, dict) else s for s in stored]
    assert sorted(stored_ids) == sorted(ids)

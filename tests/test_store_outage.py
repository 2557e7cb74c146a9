"""A store (Redis) outage does not cascade (issue 11, item 5): with Redis frozen for ~5 s, agents
restart no trainer, the dispatcher keeps every server in rotation and says "shared state
unavailable" (not "host or network down"), learners' requests that need no store are served, those
that need it get a 503 with Retry-After, no host is reported lost, and everything resumes by itself.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from ctops_tools.procs import ctops_argv, spawn
from ctops_tools.redis_embed import EmbeddedRedis, free_port
from tests.cluster import Cluster, events, wait_for
from tests.test_notifications import Receiver

FREEZE_S = 5.0


@contextmanager
def frozen(redis: EmbeddedRedis) -> Iterator[float]:
    assert redis.pid is not None
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        os.kill(redis.pid, signal.SIGCONT)


def running(c: Cluster) -> dict[str, tuple[int, int]]:
    """Supervised process -> (pid, restarts), for those running."""
    return {p["name"]: (p["pid"], p["restarts"]) for h in c.state()["hosts"] for p in h["processes"]
            if p["state"] == "running"}


def test_frozen_redis_restarts_nothing_and_is_reported_as_shared_state(
        make_cluster: Callable[..., Cluster], redis_server: EmbeddedRedis) -> None:
    c = make_cluster(hosts_with_agents=True)
    rx = Receiver()
    with open(c.config, "a") as f:
        f.write(f'[[webhooks]]\nname = "ops"\nurl = "http://127.0.0.1:{rx.port}/hook"\nmin_severity = "info"\n')
    rx.up()
    c.start_all()
    before = wait_for("three supervised trainers running", lambda: len(r := running(c)) == 3 and r, 60)
    assert all(restarts == 0 for _, restarts in before.values())
    wait_for("the store seen steadily", lambda: c.state()["store"]["available"], 30)
    with httpx.Client(base_url=c.data_url(), timeout=10) as learner:
        sid = learner.post("/api/sessions", json={"learner": "ada"}).json()["session_id"]
        last_event = events(c)[-1]["id"]
        seen: list[dict[str, Any]] = []

        def sample() -> dict[str, Any]:
            seen.append(c.state())
            return seen[-1]

        with frozen(redis_server) as t0:
            st = wait_for("shared state unavailable", lambda: (s := sample())["store"]["available"] is False and s, 15)
            assert "shared state unavailable" in st["store"]["diagnosis"]
            wait_for("servers diagnosed as shared state unavailable",
                     lambda: {s["diagnosis"] for s in sample()["servers"]} == {"shared state unavailable"}, 10)
            # learners: what needs no store is served; what needs it is a clear 503 to retry
            for _ in range(6):
                r = learner.get("/api/exercises")
                assert r.status_code == 200, r.text
            # what needs the store waits for it (the store client's retry budget outlasts a failover),
            # here until the thaw; a longer outage would end in a 503 with Retry-After
            waiting = concurrent.futures.ThreadPoolExecutor(1).submit(learner.get, f"/api/sessions/{sid}",
                                                                      timeout=60)
            check = subprocess.run(ctops_argv("status", "--url", c.ops_url(), "--token", c.viewer_token),
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == 2 and "store unavailable" in check.stdout.splitlines()[-1], check.stdout
            while time.monotonic() - t0 < FREEZE_S:
                sample()
                time.sleep(0.2)
            sample()
        r = waiting.result(60)
        assert r.status_code == 200 and r.json()["session_id"] == sid, r.text
        # through the outage the dispatcher routed on what it knew: no server out, no host lost
        assert {s["state"] for st in seen for s in st["servers"]} == {"up"}
        assert {h["state"] for st in seen for h in st["hosts"]} <= {"alive", "late"}
        wait_for("the store back", lambda: c.state()["store"]["available"], 30)
        wait_for("learners served from the store again", lambda: learner.get(f"/api/sessions/{sid}").status_code
                 == 200, 30)
        assert learner.post("/api/sessions", json={"learner": "grace"}).status_code == 201
    wait_for("diagnosis ok again", lambda: {s["diagnosis"] for s in c.state()["servers"]} == {"ok"}, 30)
    wait_for("hosts alive", lambda: {h["state"] for h in c.state()["hosts"]} == {"alive"}, 30)
    assert running(c) == before  # same pids, no restart
    kinds = wait_for("store_unavailable and store_back events",
                     lambda: (k := [e["kind"] for e in events(c, after=last_event)])
                     and {"store_unavailable", "store_back"} <= set(k) and k, 30)
    assert kinds.index("store_unavailable") < kinds.index("store_back")
    # nothing else is blamed: no host, no server, no process, no dispatcher loop
    assert not {"host_lost", "server_down", "server_suspect", "process_restarted", "loop_restarted"} & set(kinds), kinds
    # and staff are told through the webhook too
    delivered = wait_for("store events at the webhook", lambda: {e["kind"]: e for e in rx.events()
                                                                 if e["kind"].startswith("store_")}, 30)
    assert delivered["store_unavailable"]["severity"] == "critical"
    assert "shared state unavailable" in delivered["store_unavailable"]["message"]
    rx.down()


def test_a_server_that_alone_cannot_reach_the_store_leaves_rotation(make_cluster: Callable[..., Cluster]) -> None:
    """The other side of the rule: when the dispatcher reaches the store and one server does not, the
    problem is that server's, and learners must not be sent there."""
    c = make_cluster()
    # trainer-3 runs from a copy of the deployment whose Redis address answers nothing
    bad = c.root / "cut-off.toml"
    good = f"redis://{c.redis.address}/0"
    assert good in c.config.read_text()
    bad.write_text(c.config.read_text().replace(good, f"redis://127.0.0.1:{free_port()}/0"))
    for name in ("primary", "secondary", "trainer-1", "trainer-2"):
        c.start(name)
    c.children["trainer-3"] = spawn("trainer-3", ctops_argv("trainer", "--config", str(bad), "--name", "trainer-3"),
                                    str(c.root / "logs" / "trainer-3.log"), c.env)
    c.start("A")
    # (it may be down at first for not listening yet; then for its own reason)
    wait_for("trainer-3 down for not reaching the store", lambda: (s := c.server("trainer-3"))["state"] == "down"
             and "cannot reach the shared store" in (s["last_error"] or ""), 60)
    c.wait_state("trainer-1", "up")
    c.wait_state("trainer-2", "up")
    assert c.state()["store"]["available"] is True
    # new learners (no session cookie yet) are spread over the servers that can serve them
    served = {httpx.post(c.data_url() + "/api/sessions", json={}, timeout=10).json()["server"] for _ in range(9)}
    assert served == {"trainer-1", "trainer-2"}


def test_the_leader_keeps_leading_after_a_store_outage(make_cluster: Callable[..., Cluster],
                                                       redis_server: EmbeddedRedis) -> None:
    """No leader can renew while the store is away; once it is back, the one that led takes its lease
    back, rather than whichever dispatcher happens to ask first (a needless leader change)."""
    c = make_cluster(dispatchers=("A", "B"))
    c.start_all()
    leader = wait_for("one leader seen by both", lambda: (ls := {c.state(d)["leader"] for d in c.dispatchers})
                      and len(ls) == 1 and None not in ls and ls.pop(), 60)
    wait_for("the store seen steadily by both", lambda: all(c.state(d)["store"]["available"] for d in c.dispatchers))
    last_event = events(c)[-1]["id"]
    with frozen(redis_server) as t0:
        wait_for("the outage seen by both", lambda: not any(c.state(d)["store"]["available"] for d in c.dispatchers),
                 15)
        # and said as it is: nobody leads while the lease cannot be renewed
        wait_for("no leader reported", lambda: all(c.state(d)["leader"] is None for d in c.dispatchers), 15)
        while time.monotonic() - t0 < FREEZE_S:
            time.sleep(0.2)
    wait_for(f"{leader} leading again", lambda: all(c.state(d)["leader"] == leader for d in c.dispatchers), 30)
    wait_for("store_back recorded", lambda: "store_back" in {e["kind"] for e in events(c, after=last_event)}, 30)
    changes = [e["target"] for e in events(c, after=last_event) if e["kind"] == "leader_changed"]
    assert set(changes) <= {leader}, changes

"""README claims about the dispatcher, each shown end to end with real processes: a restarted
dispatcher keeps staff states, a leader that hears a newer epoch (and finds the lease moved) steps
down, and which data-plane build the dispatcher imports is visible in `/api/v1/state`."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

import httpx
import redis

from ctops.keys import Keys
from dispatcher.planebuild import data_plane_build, describe
from tests.cluster import Cluster, wait_for


def role(c: Cluster, d: str) -> str:
    return next(x["role"] for x in c.state(d)["dispatchers"] if x["name"] == d)


def test_a_restarted_dispatcher_keeps_drain_and_disable(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster()
    c.start_all()
    op = c.auth("operator")
    for server, action in (("trainer-1", "drain"), ("trainer-2", "disable")):
        r = httpx.post(f"{c.ops_url()}/api/v1/servers/{server}/{action}", headers=op, timeout=10)
        assert r.status_code == 200, r.text
    c.signal("A", signal.SIGTERM)
    c.children["A"].proc.wait(30)
    c.start("A")
    wait_for("the restarted dispatcher answering", lambda: c.state())
    wait_for("trainer-3 up again", lambda: c.server("trainer-3")["state"] == "up")
    states = {s["name"]: (s["state"], s["admin"]) for s in c.state()["servers"]}
    assert states == {"trainer-1": ("draining", "draining"), "trainer-2": ("disabled", "disabled"),
                      "trainer-3": ("up", "enabled")}, states
    # and learners are routed by it: new sessions go to the one enabled server only
    served = {httpx.post(c.data_url() + "/api/sessions", json={}, timeout=10).json()["server"] for _ in range(6)}
    assert served == {"trainer-3"}


def test_the_data_plane_build_the_dispatcher_imports_is_in_its_state(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(trainers=1)
    c.start("trainer-1")
    c.start("A")
    c.wait_all_up()
    shown = c.state()["data_plane"]
    here = data_plane_build()  # the same tree, so the same build as this test process imports
    assert shown == here, (shown, here)
    assert shown["kind"] in ("compiled", "python") and shown["stale"] is False
    # `ctops bench proxy` prints the same build in its header
    from ctops_tools.bench.proxy import data_plane_build as bench_build

    assert bench_build() == describe(shown)


def test_a_leader_that_hears_a_newer_epoch_steps_down_only_once_the_lease_moved(
        make_cluster: Callable[..., Cluster]) -> None:
    """B is in the deployment but not running; the test speaks with B's peer credential. The lease
    renews and health is published (a fenced write, which also finds a moved lease) rarely here, so
    only the heartbeat can make A look at the lease before the test is over."""
    c = make_cluster(dispatchers=("A", "B"), trainers=1,
                     timings={"lease_ttl_ms": 60_000, "lease_renew_ms": 30_000, "health_interval_ms": 60_000})
    c.start("trainer-1")
    c.start("A")
    wait_for("A leads", lambda: c.state()["leader"] == "A" and role(c, "A") == "leader")
    r = redis.Redis.from_url(c.redis.url)
    k = Keys(c.prefix)
    epoch = int(r.get(k.epoch))
    url = f"{c.ops_url()}/api/v1/peer/heartbeat"

    def claim(e: int) -> httpx.Response:
        hb = {"name": "B", "role": "leader", "epoch": e, "sent_at_ms": 1}
        return httpx.post(url, json=hb, headers=c.auth("peer:B"), timeout=10)

    # a claim alone (the lease is still A's) changes nothing: A re-reads the lease and keeps leading
    ack = claim(epoch + 3)
    assert ack.status_code == 200 and ack.json()["role"] == "leader", ack.text
    for _ in range(20):  # the re-read takes a round trip to Redis; give it plenty
        assert role(c, "A") == "leader"
        time.sleep(0.15)
    assert "steps down" not in c.log("A")
    # the lease really moves on (as if B had taken it while A was cut off) and B says so
    r.set(k.leader, f"B|{epoch + 7}", px=60_000)
    r.set(k.epoch, epoch + 7)
    wait_for("A steps down", lambda: claim(epoch + 7).json()["role"] != "leader" and role(c, "A") != "leader")
    log = c.log("A")
    # stepped down on the heartbeat (not the renewal, 30 s away), having read the moved lease
    assert re.search(rf"A steps down: peer B claims to lead at epoch \d+; the lease is B\|{epoch + 7}", log), log
    assert c.state()["leader"] in ("B", None)
    r.close()

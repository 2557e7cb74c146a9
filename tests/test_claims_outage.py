"""README claims about a Redis outage, end to end: ops API calls that need Redis answer 503 with
`Retry-After`, the data port keeps proxying, and agents keep their events queued and resend them
once the store is back (each stored once)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import httpx

from ctops_tools.procs import pid_alive
from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, events, host, process, wait_for
from tests.test_store_outage import frozen


def test_ops_api_503_proxying_goes_on_and_agent_events_are_resent(
        make_cluster: Callable[..., Cluster], redis_server: EmbeddedRedis) -> None:
    c = make_cluster(trainers=1, hosts_with_agents=True)
    c.start_all()
    pid = wait_for("trainer-1 running under its agent", lambda: (p := process(c, "host-1")).get("state") == "running"
                   and p["pid"], 60)
    wait_for("the store seen steadily", lambda: c.state()["store"]["available"], 30)
    mark = events(c)[-1]["id"]
    with frozen(redis_server):
        wait_for("the outage seen", lambda: c.state()["store"]["available"] is False, 30)
        # a staff action needs Redis: a clear 503 telling when to come back, and nothing half done
        r = httpx.post(c.ops_url() + "/api/v1/servers/trainer-1/drain", headers=c.auth("operator"), timeout=60)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1 and "unavailable" in r.json()["error"], (r.headers, r.text)
        # learners' requests that need no store are proxied as before
        for _ in range(5):
            assert httpx.get(c.data_url() + "/api/exercises", timeout=10).status_code == 200
        # the agent restarts a crashed trainer without the store; its event cannot be stored yet
        os.kill(pid, signal.SIGKILL)
        wait_for("the old trainer gone", lambda: not pid_alive(pid), 30)
        wait_for("trainer-1 answering again", lambda: httpx.get(c.trainer_url("trainer-1") + "/healthz",
                                                                timeout=2).status_code == 200, 60)
    wait_for("the store back", lambda: c.state()["store"]["available"], 60)
    # heartbeats held up in the dispatcher by the outage are written late; none may put an older
    # state of the host back over a newer one (watched for longer than the store client's retries)
    seen: list[int] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        seen.append(host(c, "host-1")["seq"] or 0)
        time.sleep(0.1)
    assert seen == sorted(seen), f"the host's heartbeat went backwards: {seen}"
    restarted = wait_for("the queued restart event stored", lambda: [
        e for e in events(c, after=mark) if e["kind"] == "process_restarted" and e["target"] == "trainer-1"], 60)
    seq = host(c, "host-1")["seq"] or 0
    wait_for("more heartbeats after it", lambda: (host(c, "host-1")["seq"] or 0) >= seq + 3, 60)
    again = [e for e in events(c, after=mark) if e["kind"] == "process_restarted" and e["target"] == "trainer-1"]
    assert len(again) == 1 == len(restarted) and "SIGKILL" in again[0]["message"], again
    assert c.server("trainer-1")["admin"] == "enabled"  # the refused drain left nothing behind
    assert process(c, "host-1")["pid"] != pid, host(c, "host-1")

"""Passive redundancy of the dispatcher with real processes and real signals: a standby takes
over when the leader is killed or frozen, a thawed old leader never acts as leader again, Redis
pauses do not make two leaders, and staff can switch leadership over."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time

import httpx
import pytest
import redis

from ctops.keys import Keys
from ctops_tools.load import run_load
from tests.cluster import Cluster, wait_for

# a frozen leader must outlast loop_blocked_exit_ms to show it does not take being frozen for a blocked loop
pytestmark = pytest.mark.quick_timings


def leader(c: Cluster, d: str) -> str | None:
    return c.state(d)["leader"]


def role_of(c: Cluster, d: str) -> str:
    st = c.state(d)
    return next(x["role"] for x in st["dispatchers"] if x["name"] == d)


def host_seq(c: Cluster, d: str, host: str = "host-1") -> int:
    return next(h["seq"] or 0 for h in c.state(d)["hosts"] if h["name"] == host)


def first_leader(c: Cluster) -> tuple[str, str]:
    lead = wait_for("a leader", lambda: leader(c, "A"))
    return lead, ("B" if lead == "A" else "A")


def test_leader_killed_under_load_standby_serves_with_no_failed_requests(make_cluster) -> None:
    c: Cluster = make_cluster(dispatchers=("A", "B"), hosts_with_agents=True)
    c.start_all()
    old, new = first_leader(c)
    report = {}

    def load() -> None:
        report["r"] = asyncio.run(run_load([c.data_url(old), c.data_url(new)], concurrency=6, duration=10))

    t = threading.Thread(target=load)
    t.start()
    time.sleep(3)
    c.signal(old, signal.SIGKILL)
    wait_for(f"{new} leads", lambda: leader(c, new) == new)
    seq = host_seq(c, new)
    wait_for("heartbeats keep arriving at the new leader", lambda: host_seq(c, new) > seq + 2)
    t.join(120)
    r = report["r"].as_dict()
    assert r["failed"] == 0, r
    assert r["submissions"]["completed"] > 0 and r["submissions"]["duplicates"] == 0, r
    st = c.state(new)
    assert next(d for d in st["dispatchers"] if d["name"] == new)["epoch"] >= 2
    evs = httpx.get(c.ops_url(new) + "/api/v1/events", params={"limit": 1000}, headers=c.auth("viewer")).json()
    assert any(e["kind"] == "leader_changed" and e["target"] == new for e in evs)
    # the agents moved to the new leader without a gap it could take for host silence
    assert [e for e in evs if e["kind"] == "host_lost"] == []
    assert {h["state"] for h in st["hosts"]} <= {"alive", "late"}, st["hosts"]


def test_frozen_leader_never_acts_again_and_rejoins_as_standby(make_cluster) -> None:
    c: Cluster = make_cluster(dispatchers=("A", "B"))
    c.start_all()
    old, new = first_leader(c)
    r = redis.Redis.from_url(c.redis.url)
    k = Keys(c.prefix)
    c.signal(old, signal.SIGSTOP)
    frozen_at_ms = int(time.time() * 1000)
    try:
        wait_for(f"{new} leads", lambda: leader(c, new) == new)
        # a change that the old leader will see the moment it wakes up
        c.signal("trainer-2", signal.SIGKILL)
        c.wait_state("trainer-2", "down", new)
        time.sleep(1.5)  # longer than the lease TTL in total
    finally:
        c.signal(old, signal.SIGCONT)
    wait_for(f"{old} back as standby", lambda: role_of(c, old) == "standby")
    c.wait_state("trainer-2", "down", old)  # its own checks see it too
    time.sleep(2)
    assert leader(c, old) == new and leader(c, new) == new
    # nothing written by the old leader after it froze: no events, no health publication
    events = httpx.get(c.ops_url(new) + "/api/v1/events", params={"limit": 1000}, headers=c.auth("viewer")).json()
    assert [e for e in events if e["source"] == f"dispatcher:{old}" and e["ts_ms"] > frozen_at_ms] == []
    assert r.hget(k.server("trainer-2"), "checked_by") == new.encode()
    assert "steps down" in c.log(old)
    # being frozen is not a blocked event loop: the thawed dispatcher stays up and restarts nothing
    assert c.children[old].alive() and "event loop blocked" not in c.log(old)
    assert "restarting it" not in c.log(old)
    r.close()


def test_redis_pauses_never_make_two_leaders(make_cluster) -> None:
    # a lease far longer than the short pause, so that "nothing changes" does not hang on how fast
    # a starved leader renews once Redis answers again (the outcome is tested, not a deadline)
    c: Cluster = make_cluster(dispatchers=("A", "B"), timings={"lease_ttl_ms": 5000})
    c.start_all()
    lead, other = first_leader(c)
    r = redis.Redis.from_url(c.redis.url)
    k = Keys(c.prefix)
    epoch = int(r.get(k.epoch))
    events_before = len(httpx.get(c.ops_url(lead) + "/api/v1/events", params={"limit": 1000},
                                  headers=c.auth("viewer")).json())
    # a tenth of the lease: nobody notices, leadership does not move
    r.execute_command("CLIENT", "PAUSE", 500, "ALL")
    wait_for("the lease renewed after the pause", lambda: int(r.pttl(k.leader)) > 5000 - 2000)
    assert int(r.get(k.epoch)) == epoch
    assert leader(c, "A") == lead and leader(c, "B") == lead
    evs = httpx.get(c.ops_url(lead) + "/api/v1/events", params={"limit": 1000}, headers=c.auth("viewer")).json()
    # (the first election's own event may be written just after `events_before` was read)
    changes = [e for e in evs[events_before:] if e["kind"] == "leader_changed"
               and (e["target"] != lead or f"(epoch {epoch})" not in e["message"])]
    assert changes == []
    # longer than the lease: the leader stops trusting its lease; afterwards one leader, at most one new term
    r.execute_command("CLIENT", "PAUSE", 7000, "ALL")
    time.sleep(8)
    views = wait_for("both agree on one leader",
                     lambda: (a := leader(c, "A")) is not None and a == leader(c, "B") and a)
    assert views in ("A", "B")
    assert int(r.get(k.epoch)) <= epoch + 1
    roles = {d: role_of(c, d) for d in ("A", "B")}
    assert sorted(roles.values()) == ["leader", "standby"]
    assert c.children["A"].alive() and c.children["B"].alive()
    r.close()


def test_staff_switchover_moves_leadership_and_is_audited(make_cluster) -> None:
    c: Cluster = make_cluster(dispatchers=("A", "B"))
    c.start_all()
    lead, other = first_leader(c)
    op = c.auth("operator")
    assert httpx.post(c.ops_url(lead) + f"/api/v1/dispatchers/{lead}/promote", headers=op).status_code == 409
    assert httpx.post(c.ops_url(lead) + f"/api/v1/dispatchers/{other}/promote",
                      headers=c.auth("viewer")).status_code == 403
    res = httpx.post(c.ops_url(lead) + f"/api/v1/dispatchers/{other}/promote", headers=op, timeout=10)
    assert res.status_code == 200, res.text
    assert res.json()["leader_before"] == lead and res.json()["leader_after"] == other
    wait_for(f"{other} leads", lambda: leader(c, lead) == other and role_of(c, lead) == "standby")
    res = httpx.post(c.ops_url(lead) + f"/api/v1/dispatchers/{other}/step-down", headers=op, timeout=10)
    assert res.status_code == 200, res.text
    assert res.json()["leader_after"] == lead
    audit = httpx.get(c.ops_url(lead) + "/api/v1/audit", headers=c.auth("viewer")).json()
    actions = [(a["action"], a["target"], a["who"]) for a in audit if a["action"] in ("promote", "step-down")]
    assert actions[:2] == [("step-down", f"dispatcher {other}", "test-operator"),
                           ("promote", f"dispatcher {other}", "test-operator")]
    assert audit[0]["result"].startswith("ok:")


def test_promotion_hook_runs_on_leader_change(make_cluster, tmp_path) -> None:
    c: Cluster = make_cluster(dispatchers=("A", "B"), trainers=1)
    marker = tmp_path / "vip.log"
    text = c.config.read_text()
    hook = f'on_promote = ["sh", "-c", "echo promote $CTOPS_DISPATCHER $CTOPS_ROLE $CTOPS_EPOCH. >> {marker}"]\n'
    hook += f'on_demote = ["sh", "-c", "echo demote $CTOPS_DISPATCHER $CTOPS_ROLE >> {marker}"]\n'
    c.config.write_text(text.replace('name = "A"\n', 'name = "A"\n' + hook, 1).replace(
        'name = "B"\n', 'name = "B"\n' + hook, 1))
    c.start_all()
    lead, other = first_leader(c)
    wait_for("promote hook", lambda: marker.exists() and f"promote {lead}" in marker.read_text())
    # the hook is told the term it leads: the epoch the dispatcher reports, never an empty variable
    first = re.search(rf"^promote {lead} (\S+) (\d+)\.$", marker.read_text(), re.M)
    epoch_now = next(d["epoch"] for d in c.state(lead)["dispatchers"] if d["name"] == lead)
    assert first and first.group(1) == "leader" and int(first.group(2)) == epoch_now, marker.read_text()
    c.signal(lead, signal.SIGTERM)
    wait_for("hooks of the change", lambda: f"promote {other}" in marker.read_text())
    second = re.search(rf"^promote {other} leader (\d+)\.$", marker.read_text(), re.M)
    assert second and int(second.group(1)) > int(first.group(2)), marker.read_text()
    assert re.search(rf"^demote {lead} \S+$", marker.read_text(), re.M), marker.read_text()

"""Agents: heartbeats with psutil metrics reach the dispatcher; supervised processes that exit are
started again; a dead dispatcher in the agent's list is skipped for the next that answers."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from ctops_tools.bench.hammer import Hammer, serving_pid
from ctops_tools.procs import pid_alive
from tests.cluster import Cluster, host, process, wait_for


def test_heartbeats_carry_metrics_and_process_status(make_cluster) -> None:
    c: Cluster = make_cluster(hosts_with_agents=True)
    c.start_all()
    h = wait_for("host-1 heartbeat with a running trainer",
                 lambda: (h := host(c, "host-1"))["state"] == "alive" and h["processes"]
                 and h["processes"][0]["state"] == "running" and h)
    assert h["metrics"]["memory_percent"] > 0 and h["metrics"]["memory_used_bytes"] > 0
    assert 0 <= h["metrics"]["disk_percent"] <= 100
    proc = h["processes"][0]
    assert proc["name"] == "trainer-1" and proc["pid"] and proc["rss_bytes"] > 0
    seq = h["seq"]
    wait_for("heartbeats keep coming", lambda: host(c, "host-1")["seq"] > seq + 2)
    server = c.server("trainer-1")
    assert server["heartbeat_age_ms"] is not None and server["cpu_percent"] is not None


def test_killed_process_is_started_again(make_cluster) -> None:
    c: Cluster = make_cluster(hosts_with_agents=True)
    c.start_all()
    old = wait_for("trainer-2 pid", lambda: process(c, "host-2").get("pid"))
    import os
    os.kill(old, signal.SIGKILL)
    p = wait_for("trainer-2 restarted", lambda: (p := process(c, "host-2")).get("pid") not in (None, old)
                 and p["restarts"] >= 1 and p)
    assert "SIGKILL" in p["last_exit"]
    assert not pid_alive(old)
    c.wait_state("trainer-2", "up")


def test_agent_skips_a_dead_dispatcher(make_cluster) -> None:
    c: Cluster = make_cluster(dispatchers=("A", "B"), trainers=1, hosts_with_agents=True)
    # only B runs: the agent's list starts with A, which refuses connections
    c.start("primary")
    c.start("host-1")
    c.start("B")
    wait_for("heartbeat through B", lambda: host_b(c)["state"] == "alive")
    c.wait_state("trainer-1", "up", "B")


def host_b(c: Cluster) -> dict:
    return next(h for h in c.state("B")["hosts"] if h["name"] == "host-1")


def test_agent_stop_stops_its_processes(make_cluster) -> None:
    c: Cluster = make_cluster(trainers=1, hosts_with_agents=True)
    c.start_all()
    pid = wait_for("trainer pid", lambda: process(c, "host-1").get("pid"))
    c.children["host-1"].proc.send_signal(signal.SIGTERM)
    c.children["host-1"].proc.wait(15)
    wait_for("trainer stopped with its agent", lambda: not pid_alive(pid), timeout=15)


def trainer_processes(c: Cluster, agent: str) -> set[int]:
    """The agent's trainer children: the active one and its warm spare."""
    return {p.pid for p in psutil.Process(c.children[agent].pid).children() if p.status() != psutil.STATUS_ZOMBIE}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_supervised_trainer_restarts_without_refusing_a_connection(make_cluster, sig: signal.Signals) -> None:
    """The agent holds the trainer's port and a warm spare: while the trainer is killed (or frozen,
    then killed as hung) no connection to its port is refused, and the spare answers."""
    c: Cluster = make_cluster(trainers=1, hosts_with_agents=True)
    c.start_all()
    port = c.ports["trainer-1"]
    # the pid the agent reports and the one answering on the port agree (on a loaded machine a trainer
    # may be replaced during start-up, and a heartbeat can still name the one before)
    active = wait_for("trainer-1 running and answering", lambda: (p := process(c, "host-1")).get("state") == "running"
                      and p["pid"] and serving_pid(port) == p["pid"] and p["pid"])
    spare = wait_for("a warm spare next to it", lambda: (others := trainer_processes(c, "host-1") - {active})
                     and others.pop())
    assert serving_pid(port) == active
    with Hammer(port) as hammer:
        wait_for("answers before the fault", lambda: hammer.counts["ok"] >= 5)
        os.kill(active, sig)
        wait_for("the spare answering", lambda: serving_pid(port) == spare, timeout=60)
        ok_after = hammer.counts["ok"]
        wait_for("answers after the takeover", lambda: hammer.counts["ok"] >= ok_after + 5)
    assert hammer.counts["refused"] == 0, hammer.counts
    p = wait_for("the agent reports the spare as trainer-1", lambda: (p := process(c, "host-1"))["pid"] == spare and p)
    assert p["restarts"] == 1 and ("hung" in p["last_exit"]) == (sig == signal.SIGSTOP)
    wait_for("the old trainer gone", lambda: not pid_alive(active))
    c.wait_state("trainer-1", "up")

"""Diagnosis combines the agent's heartbeat with the dispatcher's checks (issue: non-stop forwarding)."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.cluster import Cluster, wait_for

# it freezes agents and trainers and waits for the checks to notice
pytestmark = pytest.mark.quick_timings


def diagnosis(c: Cluster, name: str) -> tuple[str, str | None]:
    s = c.server(name)
    return s["diagnosis"], s["diagnosis_detail"]


def test_diagnosis_tells_software_host_and_agent_faults_apart(make_cluster) -> None:
    c: Cluster = make_cluster(hosts_with_agents=True)
    c.start_all()
    # agents that started before the dispatchers back off (bounded) and are heard within a round or two
    wait_for("every server diagnosed ok", lambda: {diagnosis(c, n)[0] for n in c.server_names} == {"ok"})

    # server down, agent alive -> a software fault on that host
    r = httpx.post(c.ops_url() + "/api/v1/hosts/host-1/processes/trainer-1/stop", headers=c.auth("operator"),
                   timeout=30)
    assert r.status_code == 200, r.text
    # the next heartbeat tells why: the agent reports the process stopped
    d = wait_for("software fault", lambda: (d := diagnosis(c, "trainer-1"))[0] == "software fault"
                 and "stopped" in (d[1] or "") and d)
    assert "host-1" in d[1]

    # agent silent, server answering -> an agent fault
    c.signal("host-2", signal.SIGSTOP)
    try:
        d = wait_for("agent fault", lambda: (d := diagnosis(c, "trainer-2"))[0] == "agent fault" and d)
        assert c.server("trainer-2")["state"] == "up"
    finally:
        c.signal("host-2", signal.SIGCONT)

    # both silent -> host or network down
    pid = next(p["pid"] for h in c.state()["hosts"] if h["name"] == "host-3" for p in h["processes"])
    c.signal("host-3", signal.SIGSTOP)
    import os
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("host down", lambda: diagnosis(c, "trainer-3")[0] == "host or network down")
    finally:
        os.kill(pid, signal.SIGCONT)
        c.signal("host-3", signal.SIGCONT)
    wait_for("agent back", lambda: diagnosis(c, "trainer-2")[0] == "ok")

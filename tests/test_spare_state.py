"""The warm spare is visible: heartbeats carry each supervised server's spare (none / warming / ready /
handed over, pid), `/api/v1/state` shows it, `ctops status` names a spare that is missing. A real
agent supervising a real trainer with `warm_spare = true`, and the real `ctops status`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ctops.wire import ClusterState
from ctops_tools.procs import pid_alive
from ctops_tools.status import missing_spares, render
from tests.cluster import Cluster, process, wait_for


def spare(c: Cluster) -> dict:
    return process(c, "host-1").get("spare") or {}


def status_text(c: Cluster) -> str:
    out = subprocess.run([sys.executable, "-m", "ctops_tools.cli", "status", "--url", c.ops_url(),
                          "--token", c.viewer_token], capture_output=True, text=True, timeout=60)
    return out.stdout


def test_spare_state_through_a_crash_and_a_lost_spare(make_cluster) -> None:
    c: Cluster = make_cluster(trainers=1, hosts_with_agents=True)
    c.start_all()
    first = wait_for("a ready spare next to a running trainer",
                     lambda: (p := process(c, "host-1")).get("state") == "running"
                     and (p.get("spare") or {}).get("state") == "ready" and p, timeout=60)
    serving, spare_pid = first["pid"], first["spare"]["pid"]
    assert spare_pid and spare_pid != serving and pid_alive(spare_pid)
    text = wait_for("ctops status showing it",
                    lambda: (t := status_text(c)) and f"spare ready pid {spare_pid}" in t and t)
    assert "no warm spare" not in text

    # the server crashes: the spare takes over, and a new spare is started and gets ready
    os.kill(serving, signal.SIGKILL)
    after = wait_for("the spare serving and a new one ready",
                     lambda: (p := process(c, "host-1")).get("pid") == spare_pid
                     and (p.get("spare") or {}).get("state") == "ready" and p["spare"]["pid"] != spare_pid and p,
                     timeout=60)
    assert after["spare"]["handovers"] == 1 and pid_alive(after["spare"]["pid"])
    c.wait_state("trainer-1", "up")

    # the spare itself dies: until the agent has started another, there is none, and status says so
    os.kill(after["spare"]["pid"], signal.SIGKILL)
    missing = wait_for("the spare reported missing", lambda: (st := c.state()) and any(
        (p.get("spare") or {}).get("state") == "none" for h in st["hosts"] for p in h["processes"]) and st,
        every=0.03)
    lines = missing_spares(ClusterState.model_validate(missing))
    assert lines == ["  no warm spare: trainer-1 on host-1 (spare none); a restart now starts it cold"]
    assert lines[0] in render(ClusterState.model_validate(missing))
    wait_for("a new spare ready again", lambda: spare(c).get("state") == "ready"
             and spare(c).get("pid") not in (None, spare_pid, after["spare"]["pid"]), timeout=60)

"""`ctops status` is a monitoring check: exit 0 healthy, 1 degraded, 2 critical (3 unknown), on a
real cluster, with `--quiet` printing nothing."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable

import httpx

from ctops_tools.procs import ctops_argv
from tests.cluster import Cluster, wait_for


def status(c: Cluster, *extra: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ctops_argv("status", "--url", c.ops_url(), "--token", token or c.viewer_token, *extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def act(c: Cluster, path: str) -> None:
    r = httpx.post(f"{c.ops_url()}/api/v1{path}", headers=c.auth("operator"), timeout=30)
    assert r.status_code == 200, r.text


def test_exit_codes_follow_the_cluster(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(hosts_with_agents=True)
    c.start_all()
    wait_for("hosts alive", lambda: {h["state"] for h in c.state()["hosts"]} == {"alive"}, 60)
    seen: list[str] = []

    def healthy() -> subprocess.CompletedProcess[str] | None:
        r = status(c)
        seen[:] = [r.stdout + r.stderr]  # what it said last, for the failure message
        return r if r.returncode == 0 else None

    try:
        ok = wait_for("healthy", healthy, 90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; status said:\n{seen[0] if seen else ''}") from None
    assert ok.stdout.splitlines()[-1] == "status: OK"
    assert "store (single): primary 127.0.0.1:" in ok.stdout and "available" in ok.stdout
    quiet = status(c, "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""

    act(c, "/servers/trainer-2/disable")
    degraded = status(c)
    assert degraded.returncode == 1 and degraded.stdout.splitlines()[-1] == "status: DEGRADED - trainer-2 disabled"
    as_json = status(c, "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["store"]["available"] is True
    act(c, "/servers/trainer-2/enable")
    wait_for("healthy again", lambda: status(c).returncode == 0, 30)

    # a server down (its process stopped by its agent) is degraded; all of them, critical
    act(c, "/hosts/host-1/processes/trainer-1/stop")
    r = wait_for("trainer-1 down", lambda: (r := status(c)).returncode == 1 and "trainer-1 down" in r.stdout and r, 30)
    assert "status: DEGRADED" in r.stdout
    for i in (2, 3):
        act(c, f"/hosts/host-{i}/processes/trainer-{i}/stop")
    r = wait_for("critical", lambda: (r := status(c)).returncode == 2 and r, 30)
    assert r.stdout.splitlines()[-1].startswith("status: CRITICAL - no server up; trainer-")
    assert status(c, "-q").returncode == 2

    # no dispatcher answering: critical too; a rejected token says nothing about the cluster: unknown
    assert status(c, token="not-a-token").returncode == 3
    c.signal("A", signal.SIGKILL)
    gone = wait_for("dispatcher gone", lambda: (r := status(c)).returncode == 2 and "no dispatcher" in r.stderr and r,
                    30)
    assert gone.stdout == ""

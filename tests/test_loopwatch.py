"""The dispatcher's internal loops are watched like the agent's processes: a stalled health-check
loop is restarted and reported, and health checking goes on."""

from __future__ import annotations

import signal

import pytest

from tests.cluster import Cluster, events, wait_for

# the watch calls a loop stalled after 4 health rounds: short rounds, a short wait
pytestmark = pytest.mark.quick_timings


def test_stalled_health_loop_is_restarted_and_reported(make_cluster) -> None:
    c: Cluster = make_cluster(trainers=2)
    c.env["CTOPS_TEST_HOOKS"] = "1"
    c.start_all()
    c.signal("A", signal.SIGUSR1)  # test hook: the next health round never finishes
    e = wait_for("loop restart reported", lambda: [e for e in events(c) if e["kind"] == "loop_restarted"])
    assert e[0]["target"] == "A/health" and "stalled" in e[0]["message"]
    # checks go on after the restart: a killed server is still taken out of rotation
    c.signal("trainer-2", signal.SIGKILL)
    c.wait_state("trainer-2", "down")
    assert "restarting it" in c.log("A")

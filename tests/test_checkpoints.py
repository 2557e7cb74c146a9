"""Step checkpoints and leases: a trainer server killed or frozen mid-submission, real signals."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, wait_for
from tests.trainer_cluster import (
    SLOW_GOOD,
    STEPS,
    get,
    new_session,
    poll_done,
    post,
    step_names,
    stored,
    trainer_cluster,
    wait_until_up,
)

TOML = """
[sandbox]
wall_seconds = 10
[trainer]
lease_ttl_ms = 1500
scan_interval_ms = 300
"""


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    yield from trainer_cluster(tmp_path_factory.mktemp("ckpt"), redis_server, TOML)


def running_on(c: Cluster, sub_id: str, server: str) -> bool:
    sub = stored(c, sub_id)
    return sub["status"] == "running" and sub["server"] == server


def assert_each_step_once(sub: dict, tested_by: str) -> None:
    assert step_names(sub) == STEPS, sub["steps"]
    by = {s["step"]: s["server"] for s in sub["steps"]}
    assert by["received"] == "trainer-1" and by["tested"] == tested_by and by["done"] == tested_by
    assert sub["verdict"] == "passed" and len(sub["tests"]) == 5 and sub["review"]["status"] == "done"


def test_killed_server_work_is_finished_by_another_polled_or_not(c: Cluster) -> None:
    t1, t2 = c.trainer_url("trainer-1"), c.trainer_url("trainer-2")
    sid = new_session(t1)
    polled = post(t1, sid, SLOW_GOOD).json()["submission_id"]
    unpolled = post(t1, sid, SLOW_GOOD).json()["submission_id"]
    for sub_id in (polled, unpolled):
        wait_for("the tests to be running on trainer-1", lambda s=sub_id: running_on(c, s, "trainer-1"))
    c.signal("trainer-1", signal.SIGKILL)
    c.children["trainer-1"].proc.wait(30)
    # the learner's polls land on trainer-2, which takes the expired lease over
    done = poll_done(t2, sid, polled)
    assert_each_step_once(done, "trainer-2")
    # nobody polls the other one: trainer-2's scanner takes it over all the same
    other = wait_for("the unpolled submission to be done", lambda: (s := stored(c, unpolled))["status"] == "done"
                     and s, 60)
    assert_each_step_once(other, "trainer-2")
    c.start("trainer-1")
    wait_until_up(c, "trainer-1")


def test_frozen_server_cannot_overwrite_the_work_taken_over(c: Cluster) -> None:
    t1, t2 = c.trainer_url("trainer-1"), c.trainer_url("trainer-2")
    sid = new_session(t1)
    sub_id = post(t1, sid, SLOW_GOOD).json()["submission_id"]
    wait_for("the tests to be running on trainer-1", lambda: running_on(c, sub_id, "trainer-1"))
    c.signal("trainer-1", signal.SIGSTOP)
    try:
        done = poll_done(t2, sid, sub_id)
    finally:
        c.signal("trainer-1", signal.SIGCONT)
    assert_each_step_once(done, "trainer-2")
    # thawed, trainer-1 finds its lease gone and drops its own run's result without writing
    wait_for("trainer-1 to drop the work", lambda: "dropped" in c.log("trainer-1") and "lease" in c.log("trainer-1"))
    assert stored(c, sub_id) == done
    assert get(t1, sid, sub_id) == done

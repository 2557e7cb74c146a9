"""Degraded mode: with every LLM provider down, submissions still complete with the review pending;
once a provider is back every pending review is filled in exactly once. Real processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, wait_for
from tests.trainer_cluster import (
    GOOD,
    fake_stats,
    get,
    keys,
    new_session,
    poll_done,
    post,
    rclient,
    set_mode,
    step_names,
    trainer_cluster,
)

TOML = """
[trainer]
review_budget_ms = 4000
review_retry_initial_ms = 300
review_retry_max_ms = 1500
"""


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    yield from trainer_cluster(tmp_path_factory.mktemp("degraded"), redis_server, TOML)


@pytest.fixture
def providers_ok(c: Cluster) -> Iterator[Cluster]:
    for p in ("primary", "secondary"):
        set_mode(c, p, "ok")
    yield c
    for p in ("primary", "secondary"):
        set_mode(c, p, "ok")


def test_failed_primary_falls_over_to_the_secondary(providers_ok: Cluster) -> None:
    c = providers_ok
    t1 = c.trainer_url("trainer-1")
    set_mode(c, "primary", "500")
    sid = new_session(t1)
    done = poll_done(t1, sid, post(t1, sid, GOOD).json()["submission_id"])
    assert done["review"]["status"] == "done" and done["review"]["provider"] == "secondary"
    assert "[secondary]" in done["review"]["text"]


def test_all_providers_down_then_back_fills_each_pending_review_once(providers_ok: Cluster) -> None:
    c = providers_ok
    t1, t2 = (c.trainer_url(n) for n in c.server_names)
    set_mode(c, "primary", "500")
    set_mode(c, "secondary", "hang")
    sid = new_session(t1)
    subs = [post(base, sid, GOOD).json()["submission_id"] for base in (t1, t2, t1, t2)]
    done = [poll_done(t1, sid, s) for s in subs]
    for d in done:
        assert d["verdict"] == "passed" and len(d["tests"]) == 5
        assert d["review"]["status"] == "pending" and "delayed" in d["review"]["message"]
        assert step_names(d) == ["received", "tested", "review_requested", "review_deferred", "done"]
    with rclient(c) as r:
        assert set(r.zrange(keys(c).reviews_pending, 0, -1)) >= set(subs)

    before = fake_stats(c, "primary").get("status_200", 0)
    set_mode(c, "primary", "ok")
    set_mode(c, "secondary", "ok")
    filled = [wait_for(f"review of {s}", lambda s=s: (d := get(t2, sid, s))["review"]["status"] == "done" and d, 60)
              for s in subs]
    for d in filled:
        assert d["review"]["provider"] == "primary" and "[primary]" in d["review"]["text"]
        assert step_names(d).count("review_received") == 1
        assert step_names(d)[-1] == "review_received"
    with rclient(c) as r:
        assert not set(r.zrange(keys(c).reviews_pending, 0, -1)) & set(subs)
    # exactly once: one successful provider call per pending review, no more
    assert fake_stats(c, "primary").get("status_200", 0) - before == len(subs)

"""Test fixtures over `ctops_tools.localcluster`: a real cluster per test, stopped at the end, or one
standard cluster per test process lent to the tests that leave its parts running.

A module whose tests freeze or kill parts and wait for the cluster to notice is marked
`quick_timings`: its clusters then check health with `ctops_tools.localcluster.QUICK_TIMINGS`. A test
that kills or freezes a part of `running_dispatcher` is marked `own_cluster` and gets a cluster of
its own.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ctops_tools.localcluster import QUICK_TIMINGS, Cluster, wait_for
from ctops_tools.redis_embed import EmbeddedRedis
from trainer.fake_llm import control_headers

__all__ = ["Cluster", "wait_for", "make_cluster", "running_dispatcher", "host", "process", "events"]


def _with_marked_timings(request: pytest.FixtureRequest, kw: dict[str, Any]) -> dict[str, Any]:
    if request.node.get_closest_marker("quick_timings") is not None:
        kw = {**kw, "timings": {**QUICK_TIMINGS, **kw.get("timings", {})}}
    return kw


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest, tmp_path: Path, redis_server: EmbeddedRedis,
                 key_prefix: str) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kw: Any) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", redis_server, f"{key_prefix}:{len(made)}",
                    **_with_marked_timings(request, kw))
        made.append(c)
        return c

    (tmp_path / "c0").mkdir(parents=True, exist_ok=True)
    for i in range(1, 4):
        (tmp_path / f"c{i}").mkdir(exist_ok=True)
    yield make
    for c in made:
        c.stop()


# --- the shared standard cluster ------------------------------------------------------------------

def _post(c: Cluster, path: str) -> None:
    httpx.post(c.ops_url() + path, headers=c.auth("operator"), timeout=10).raise_for_status()


def reset(c: Cluster) -> None:
    """Back to how it started, as far as a test that kills or freezes nothing can have changed it:
    every process running (one left frozen or dead by a failed test is thawed or started again),
    every server enabled and up, no LLM provider pinned or disabled, the fakes answering."""
    for name, child in list(c.children.items()):
        if child.alive():
            os.kill(child.pid, signal.SIGCONT)
        else:
            c.start(name)
    wait_for("the ops API", lambda: c.state()["servers"], 60)
    for s in c.state()["servers"]:
        if s["admin"] != "enabled":
            _post(c, f"/api/v1/servers/{s['name']}/enable")
    pool = httpx.get(c.ops_url() + "/api/v1/llm/providers", headers=c.auth("viewer"), timeout=10).json()
    if pool["pinned"]:
        _post(c, f"/api/v1/llm/providers/{pool['pinned']}/unpin")
    for p in pool["providers"]:
        if p["disabled"]:
            _post(c, f"/api/v1/llm/providers/{p['name']}/enable")
    for fake in ("primary", "secondary"):
        httpx.post(c.trainer_url(fake) + "/_fake/mode", json={"mode": "ok"}, headers=control_headers(),
                   timeout=10).raise_for_status()
    c.wait_all_up()


@pytest.fixture(scope="session")
def shared_standard(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[list[Cluster]]:
    """Started on first use; a holder, so a cluster that cannot be reset is replaced by a fresh one."""
    held: list[Cluster] = []
    yield held
    for c in held:
        c.stop()


def _fresh_standard(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Cluster:
    root = tmp_path_factory.mktemp("shared-standard")
    c = Cluster(root, redis_server, f"t{os.getpid()}:shared:{root.name}")
    c.start_all()
    return c


@pytest.fixture
def running_dispatcher(request: pytest.FixtureRequest, make_cluster: Callable[..., Cluster],
                       shared_standard: list[Cluster], tmp_path_factory: pytest.TempPathFactory,
                       redis_server: EmbeddedRedis) -> Cluster:
    """One dispatcher in front of three real trainer servers (no agents), all up. Has ops_url(),
    tokens, server_names. Shared by the tests of this process and reset before each (see `reset`),
    unless the test is marked `own_cluster`."""
    if request.node.get_closest_marker("own_cluster") is not None:
        c = make_cluster()
        c.start_all()
        return c
    if shared_standard:
        try:
            reset(shared_standard[0])
            return shared_standard[0]
        except (AssertionError, httpx.HTTPError) as exc:
            # a cluster a failed test left beyond repair: the next test gets a new one, and says why
            print(f"shared cluster could not be reset ({exc}); starting a new one")
            shared_standard.pop().stop()
    shared_standard.append(_fresh_standard(tmp_path_factory, redis_server))
    return shared_standard[0]


def host(c: Cluster, name: str) -> dict:
    """A host as the dispatcher reports it."""
    return next(h for h in c.state()["hosts"] if h["name"] == name)


def process(c: Cluster, host_name: str, i: int = 0) -> dict:
    """The host's i-th supervised process, or {} while its agent has not reported it yet (a first
    heartbeat may come before the processes are started)."""
    procs = host(c, host_name)["processes"]
    return procs[i] if len(procs) > i else {}


def events(c: Cluster, **params: Any) -> list[dict]:
    """Events from the cluster's stream (up to 1,000)."""
    r = httpx.get(c.ops_url() + "/api/v1/events", params={"limit": 1000, **params}, headers=c.auth("viewer"))
    r.raise_for_status()
    return r.json()

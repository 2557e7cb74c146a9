"""Test fixtures over `ctops_tools.localcluster`: a real cluster per test, stopped at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ctops_tools.localcluster import Cluster, wait_for
from ctops_tools.redis_embed import EmbeddedRedis

__all__ = ["Cluster", "wait_for", "make_cluster", "running_dispatcher", "host", "process", "events"]


@pytest.fixture
def make_cluster(tmp_path: Path, redis_server: EmbeddedRedis, key_prefix: str) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kw: Any) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", redis_server, f"{key_prefix}:{len(made)}", **kw)
        made.append(c)
        return c

    (tmp_path / "c0").mkdir(parents=True, exist_ok=True)
    for i in range(1, 4):
        (tmp_path / f"c{i}").mkdir(exist_ok=True)
    yield make
    for c in made:
        c.stop()


@pytest.fixture
def running_dispatcher(make_cluster: Callable[..., Cluster]) -> Cluster:
    """One dispatcher in front of three real trainer servers, all up. Has ops_url(), tokens, server_names."""
    c = make_cluster()
    c.start_all()
    return c


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

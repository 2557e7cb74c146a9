"""Two real `ctops trainer` servers and the two real fake LLM providers on one Redis, without a
dispatcher, and what a learner's browser does against them (POST, then poll)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from ctops.envelope import unseal
from ctops.keys import Keys
from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, wait_for
from tests.common import FIZZBUZZ_GOOD as GOOD
from trainer.fake_llm import control_headers

# slow enough for a test to kill the server while the tests run, well within the wall limit
SLOW_GOOD = "import time\ntime.sleep(2.5)\n" + GOOD
STEPS = ["received", "tested", "review_requested", "review_received", "done"]


def trainer_cluster(root: Path, redis_server: EmbeddedRedis, extra_toml: str) -> Iterator[Cluster]:
    c = Cluster(root, redis_server, f"t{os.getpid()}:{uuid.uuid4().hex[:8]}", trainers=2, extra_toml=extra_toml)
    try:
        for name in ("primary", "secondary", "trainer-1", "trainer-2"):
            c.start(name)
        for name in ("primary", "secondary"):
            wait_for(f"{name} up", lambda n=name: httpx.get(fake_url(c, n) + "/_fake/mode", timeout=2).is_success)
        for name in c.server_names:
            wait_until_up(c, name)
        yield c
    finally:
        c.stop()


def wait_until_up(c: Cluster, name: str) -> None:
    wait_for(f"{name} up", lambda: httpx.get(c.trainer_url(name) + "/healthz", timeout=2).is_success, 60)


def fake_url(c: Cluster, name: str) -> str:
    return f"http://127.0.0.1:{c.ports[name]}"


def set_mode(c: Cluster, name: str, mode: str) -> None:
    r = httpx.post(fake_url(c, name) + "/_fake/mode", json={"mode": mode}, headers=control_headers(), timeout=5)
    assert r.status_code == 200, r.text


def fake_stats(c: Cluster, name: str) -> dict[str, int]:
    return httpx.get(fake_url(c, name) + "/_fake/stats", timeout=5).json()["requests"]


def keys(c: Cluster) -> Keys:
    return Keys(prefix=c.prefix)


def rclient(c: Cluster, decode: bool = True) -> redis.Redis:
    return redis.Redis.from_url(c.redis.url, decode_responses=decode)


def stored(c: Cluster, sub_id: str) -> dict:
    with rclient(c, decode=False) as r:
        raw = r.get(keys(c).submission(sub_id))
    assert raw, f"submission {sub_id} is not in Redis"
    rec = unseal(keys(c).submission(sub_id), raw, "submission")
    assert rec is not None
    return json.loads(rec.payload)


def new_session(base: str, **headers: str) -> str:
    r = httpx.post(base + "/api/sessions", json={"learner": "ada"}, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def post(base: str, sid: str, code: str = GOOD, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{base}/api/sessions/{sid}/submissions", json={"exercise_id": "fizzbuzz", "code": code},
                      headers=headers, timeout=60)


def get(base: str, sid: str, sub_id: str) -> dict:
    r = httpx.get(f"{base}/api/sessions/{sid}/submissions/{sub_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def poll_done(base: str, sid: str, sub_id: str, timeout: float = 60.0) -> dict:
    return wait_for(f"{sub_id} done", lambda: (s := get(base, sid, sub_id))["status"] == "done" and s, timeout)


def step_names(sub: dict) -> list[str]:
    return [s["step"] for s in sub["steps"]]


def sandbox_runs(c: Cluster) -> int:
    with rclient(c) as r:
        return int(r.get(keys(c).sandbox_runs) or 0)

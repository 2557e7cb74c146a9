"""`Idempotency-Key`: one execution across trainer servers, identical answers, real processes."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster
from tests.trainer_cluster import (
    GOOD,
    STEPS,
    keys,
    new_session,
    poll_done,
    post,
    rclient,
    sandbox_runs,
    step_names,
    trainer_cluster,
)

TOML = """
[trainer]
idempotency_wait_ms = 1500
"""


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    yield from trainer_cluster(tmp_path_factory.mktemp("idem"), redis_server, TOML)


def at_once(*calls) -> list[httpx.Response]:  # noqa: ANN002 - zero-argument callables
    """Run the calls in threads released together, so the requests race for real."""
    gate = threading.Barrier(len(calls))
    out: list[httpx.Response | None] = [None] * len(calls)

    def run(i: int) -> None:
        gate.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(out), "a request did not finish"
    return out  # type: ignore[return-value]


def test_same_key_on_two_servers_at_once_executes_one_submission(c: Cluster) -> None:
    t1, t2 = (c.trainer_url(n) for n in c.server_names)
    sid = new_session(t1)
    runs_before = sandbox_runs(c)
    h = {"Idempotency-Key": "sub-key-1"}
    a, b = at_once(lambda: post(t1, sid, GOOD, h), lambda: post(t2, sid, GOOD, h))
    assert (a.status_code, b.status_code) == (202, 202), (a.text, b.text)
    assert a.json() == b.json()
    assert sorted(r.headers.get("idempotent-replayed", "") for r in (a, b)) == ["", "true"]
    sub_id = a.json()["submission_id"]
    done = poll_done(t2, sid, sub_id)
    assert done["verdict"] == "passed" and step_names(done) == STEPS
    # one submission in the session and one sandbox run
    session = httpx.get(f"{t1}/api/sessions/{sid}", timeout=30).json()
    assert [s["submission_id"] for s in session["submissions"]] == [sub_id]
    assert sandbox_runs(c) == runs_before + 1
    # a later repeat gets the stored answer, on either server
    again = post(t1, sid, GOOD, h)
    assert again.status_code == 202 and again.json() == a.json() and again.headers["idempotent-replayed"] == "true"


def test_same_key_creates_one_session(c: Cluster) -> None:
    t1, t2 = (c.trainer_url(n) for n in c.server_names)
    h = {"Idempotency-Key": "session-key-1"}

    def create(base: str):  # noqa: ANN202
        return lambda: httpx.post(base + "/api/sessions", json={"learner": "once-only"}, headers=h, timeout=30)

    a, b = at_once(create(t1), create(t2))
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json() == b.json()
    assert a.headers["set-cookie"] == b.headers["set-cookie"]
    assert f"ctops_session={a.json()['session_id']}" in a.headers["set-cookie"]
    with rclient(c) as r:
        sessions = [k for k in r.scan_iter(f"{c.prefix}:session:*") if r.type(k) == "hash"]
        assert sum(r.hget(k, "learner") == "once-only" for k in sessions) == 1


def test_key_misuse_is_a_clear_4xx(c: Cluster) -> None:
    t1 = c.trainer_url("trainer-1")
    sid = new_session(t1)
    h = {"Idempotency-Key": "sub-key-2"}
    assert post(t1, sid, GOOD, h).status_code == 202
    other = post(t1, sid, GOOD + "\n# changed\n", h)
    assert other.status_code == 422 and "different request" in other.json()["detail"]
    bad = post(t1, sid, GOOD, {"Idempotency-Key": "x" * 300})
    assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["detail"]
    # failed validation is not stored: the same key works once the request is right
    h3 = {"Idempotency-Key": "sub-key-3"}
    assert post(t1, "s_nope", GOOD, h3).status_code == 404
    assert httpx.post(f"{t1}/api/sessions/s_nope/submissions", json={"exercise_id": "fizzbuzz", "code": GOOD},
                      headers=h3, timeout=30).status_code == 404


def _claim(c: Cluster, key: str, path: str, body: bytes, ttl_ms: int) -> None:
    """Plant the claim a server makes when it starts a request, as if it had then died or stalled."""
    fp = hashlib.sha256(b"POST %s\n%s" % (path.encode(), body)).hexdigest()
    claim = json.dumps({"state": "pending", "fingerprint": fp, "server": "trainer-x", "nonce": "n"})
    with rclient(c) as r:
        r.set(keys(c).idempotency(hashlib.sha256(key.encode()).hexdigest()), claim, px=ttl_ms)


def test_repeat_of_a_request_in_progress_waits_then_409_or_takes_over(c: Cluster) -> None:
    t1 = c.trainer_url("trainer-1")
    sid = new_session(t1)
    path = f"/api/sessions/{sid}/submissions"
    body = json.dumps({"exercise_id": "fizzbuzz", "code": GOOD}).encode()
    send = lambda key: httpx.post(t1 + path, content=body, timeout=30,  # noqa: E731
                                  headers={"Idempotency-Key": key, "content-type": "application/json"})
    # still in progress elsewhere past the bounded wait: 409 with Retry-After, nothing executed
    _claim(c, "busy-key", path, body, ttl_ms=60_000)
    busy = send("busy-key")
    assert busy.status_code == 409 and busy.headers["retry-after"] == "1"
    assert "still in progress" in busy.json()["detail"]
    # the server holding it died before committing: its claim expires and this request executes
    _claim(c, "dead-key", path, body, ttl_ms=300)
    took = send("dead-key")
    assert took.status_code == 202 and "idempotent-replayed" not in took.headers
    poll_done(t1, sid, took.json()["submission_id"])

"""Delivered data is checked where it arrives: a malformed heartbeat, command result, request body,
idempotency replay, LLM answer or spool line is refused with a clear JSON error (or skipped), logged
and counted by source under `rejected` in the cluster state, and nothing stored changes."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ctops.capture.forwarder import Forwarder
from ctops.capture.spool import Spool
from ctops.keys import Keys
from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, wait_for
from trainer.fake_llm import control_headers


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("delivered"), redis_server, f"t{os.getpid()}:delivered", trainers=1)
    cluster.start_all()
    yield cluster
    cluster.stop()


def rejected(c: Cluster, source: str) -> int:
    return c.state()["rejected"].get(source, 0)


def wait_rejected(c: Cluster, source: str, at_least: int) -> None:
    wait_for(f"rejected.{source} >= {at_least}", lambda: rejected(c, source) >= at_least, 30)


def snapshot(c: Cluster) -> dict[bytes, bytes | None]:
    """Every key of the cluster with its DUMP: what is stored, byte for byte (counters left out)."""
    k = Keys(prefix=c.prefix)
    skip = {k.rejected.encode(), k.quarantine_stats.encode()}
    with redis.Redis.from_url(c.redis.url) as r:
        names = [n for n in r.scan_iter(match=f"{c.prefix}:*", count=1000) if n not in skip]
        # only records: presence, health, the lease and staff events move on their own
        names = [n for n in names if not any(part in n for part in (b":dispatcher:", b":server:", b":leader",
                                                                     b":events"))]
        return {n: r.dump(n) for n in sorted(names)}


def heartbeat(seq: int) -> dict:
    return {"host": "host-1", "seq": seq, "sent_at_ms": int(time.time() * 1000),
            "metrics": {"cpu_percent": 1.0, "memory_percent": 2.0, "memory_used_bytes": 1, "disk_percent": 3.0,
                        "load1": 0.1, "load5": 0.1, "load15": 0.1}}


def test_malformed_heartbeats_are_refused_counted_and_store_nothing(c: Cluster) -> None:
    url = c.ops_url() + "/api/v1/heartbeat"
    assert httpx.post(url, json=heartbeat(1), headers=c.auth("agent"), timeout=10).status_code == 200
    before, count = snapshot(c), rejected(c, "heartbeat")
    headers = {**c.auth("agent"), "content-type": "application/json"}
    bad = [(b"{not json", 400), (b'{"host": "host-1", "seq": "\xff\xfe"}', 400),
           (json.dumps({**heartbeat(2), "seq": -1}).encode(), 422),
           (json.dumps({**heartbeat(3), "metrics": {"cpu_percent": "lots"}}).encode(), 422),
           (b"[" * 300_000, 413)]
    for body, status in bad:
        r = httpx.post(url, content=body, headers=headers, timeout=10)
        assert r.status_code == status, r.text
        assert r.json()["error"]
    wait_rejected(c, "heartbeat", count + len(bad))
    assert snapshot(c) == before


def test_a_malformed_command_result_is_refused_counted_and_stores_nothing(c: Cluster) -> None:
    cmd_id = uuid.uuid4().hex
    url = f"{c.ops_url()}/api/v1/agents/host-1/commands/{cmd_id}/result"
    before, count = snapshot(c), rejected(c, "command_result")
    for body in ({"ok": "perhaps", "message": "x"}, {"ok": True, "message": "x" * 5000}, {"ok": True}):
        r = httpx.post(url, json=body, headers=c.auth("agent"), timeout=10)
        assert r.status_code == 422 and "invalid request" in r.json()["error"], r.text
    r = httpx.post(f"{c.ops_url()}/api/v1/agents/host-1/commands/not%20an%20id/result",
                   json={"ok": True, "message": "done"}, headers=c.auth("agent"), timeout=10)
    assert r.status_code == 422
    wait_rejected(c, "command_result", count + 4)
    assert snapshot(c) == before


def test_bad_learner_bodies_and_replays_are_refused_counted_and_change_nothing(c: Cluster) -> None:
    base = c.trainer_url("trainer-1")
    first = httpx.post(base + "/api/sessions", json={"learner": "ada"}, headers={"Idempotency-Key": "k-1"},
                       timeout=30)
    assert first.status_code == 201
    before = snapshot(c)
    bodies, replays = rejected(c, "request_body"), rejected(c, "idempotency_replay")
    for body, status in ((b'{"learner": 5}', 422), (b'{"learner": "\xff"}', 400),
                         (b'{"learner": "a", "extra": 1}', 422)):
        r = httpx.post(base + "/api/sessions", content=body, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == status and r.json()["detail"], r.text
    big = httpx.post(base + "/api/sessions", content=b"{" + b" " * 2_000_000 + b"}",
                     headers={"content-type": "application/json"}, timeout=30)
    assert big.status_code == 413 and big.json()
    other = httpx.post(base + "/api/sessions", json={"learner": "eve"}, headers={"Idempotency-Key": "k-1"},
                       timeout=30)
    assert other.status_code == 422 and "different request" in other.json()["detail"]
    assert httpx.post(base + "/api/sessions", json={}, headers={"Idempotency-Key": "bad key"},
                      timeout=30).status_code == 400
    wait_rejected(c, "request_body", bodies + 4)
    wait_rejected(c, "idempotency_replay", replays + 2)
    assert snapshot(c) == before
    again = httpx.post(base + "/api/sessions", json={"learner": "ada"}, headers={"Idempotency-Key": "k-1"},
                       timeout=30)
    assert again.json()["session_id"] == first.json()["session_id"]  # the stored outcome, untouched


def test_an_llm_answer_that_is_garbage_fails_over_and_is_counted(c: Cluster) -> None:
    primary = f"http://127.0.0.1:{c.ports['primary']}"
    count = rejected(c, "llm_answer")
    httpx.post(primary + "/_fake/mode", json={"mode": "garbage"}, headers=control_headers(),
               timeout=5).raise_for_status()
    try:
        url = f"{c.data_url()}/llm/v1/chat/completions"
        body = {"model": "gpt-4", "messages": [{"role": "user", "content": "review this"}]}
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("[secondary]")
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as s:
            text = b"".join(s.iter_bytes())
        assert s.status_code == 200 and b"[secondary]" in text and b"\xff\xfe" not in text
        wait_rejected(c, "llm_answer", count + 1)
    finally:
        httpx.post(primary + "/_fake/mode", json={"mode": "ok"}, headers=control_headers(), timeout=5)


def test_a_torn_spool_line_is_skipped_and_counted_where_staff_see_it(c: Cluster, tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    evs = [json.dumps({"event_id": uuid.uuid4().hex, "ts_ms": now, "service": "svc", "host": "host-1",
                       "type": "SpoolTestError", "message": f"n{i}"}).encode() for i in range(3)]
    sp = Spool(tmp_path, fsync=False)
    sp.append(evs)
    sp.close()
    seg = next(tmp_path.glob("*.seg"))
    seg.write_bytes(seg.read_bytes() + b'0badc0de 40 {"event_id": "torn')  # a write cut short
    fw = Forwarder([c.ops_url()], c.tokens["agent"], Spool(tmp_path, fsync=False), sender="spool-test")
    fw.start()
    try:
        assert fw.flush(30.0)
    finally:
        fw.close()
    wait_rejected(c, "spool_line", 1)
    groups = httpx.get(c.ops_url() + "/api/v1/exceptions/groups", headers=c.auth("viewer"), timeout=10).json()
    assert next(g for g in groups["groups"] if g["type"] == "SpoolTestError")["count"] == 3


def test_a_damaged_command_in_a_hosts_queue_is_dropped_not_a_500(c: Cluster) -> None:
    queue = Keys(prefix=c.prefix).commands("host-1")
    with redis.Redis.from_url(c.redis.url) as r:
        r.rpush(queue, b"\xff{not a command")
    url = f"{c.ops_url()}/api/v1/agents/host-1/commands"
    r1 = httpx.get(url, params={"wait_ms": 0}, headers=c.auth("agent"), timeout=10)
    assert r1.status_code == 200 and r1.json() == []
    with redis.Redis.from_url(c.redis.url) as r:
        assert r.llen(queue) == 0

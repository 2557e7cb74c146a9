"""Heartbeat ingest at scale (issue 19): a heartbeat answered 200 is in Redis, however many arrive at
once; a process list that did not change is not written again, a change is written at once; the
state change feed gives a console what changed since the version it holds; bad heartbeats are still
refused in the API's error shape and counted. Against a real dispatcher and Redis."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import pytest
import redis

from ctops.keys import Keys
from ctops.statefeed import apply_changes
from ctops.wire import HEARTBEAT_DECODER, Heartbeat, StateChanges
from ctops_tools.bench.heartbeats import sim_hosts, sim_toml
from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, wait_for

SIM = sim_hosts(40)  # simulated hosts (name -> token) besides the cluster's own host-1 and host-2


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("ingest"), redis_server, f"t{os.getpid()}:ingest", trainers=2,
                      extra_toml=sim_toml(SIM))
    cluster.start_all()
    yield cluster
    cluster.stop()


def beat(host: str, seq: int, procs: list[dict] | None = None, **over: object) -> dict:
    return {"host": host, "seq": seq, "sent_at_ms": int(time.time() * 1000),
            "metrics": {"cpu_percent": 1.0, "memory_percent": 2.0, "memory_used_bytes": 1, "disk_percent": 3.0,
                        "load1": 0.1, "load5": 0.1, "load15": 0.1},
            "processes": procs or [], **over}


def proc(state: str = "running", cpu: float = 1.0, restarts: int = 0) -> dict:
    return {"name": "trainer-x", "state": state, "pid": 4242, "restarts": restarts, "cpu_percent": cpu,
            "rss_bytes": 1 << 20}


def stored(c: Cluster, host: str) -> dict:
    with redis.Redis.from_url(c.redis.url) as r:
        raw = r.hgetall(Keys(c.prefix).host(host))
    return {k.decode(): v.decode() for k, v in raw.items()}


def post(c: Cluster, host: str, body: dict | bytes) -> httpx.Response:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    auth = {"Authorization": f"Bearer {SIM[host]}"} if host in SIM else c.auth(f"agent:{host}")
    return httpx.post(c.ops_url() + "/api/v1/heartbeat", headers={**auth, "content-type": "application/json"},
                      timeout=30, **kw)


def host_view(c: Cluster, host: str) -> dict:
    return next(h for h in c.state()["hosts"] if h["name"] == host)


def test_an_acknowledged_heartbeat_is_stored_even_when_many_arrive_together(c: Cluster) -> None:
    def host_beats(host: str) -> list[int]:
        seen = []
        for seq in range(1, 6):
            r = post(c, host, beat(host, seq))
            assert r.status_code == 200, r.text
            # answered, so written: read straight from Redis, not from a cache of the dispatcher's
            seen.append(json.loads(stored(c, host)["hb"])["seq"])
        return seen

    # many hosts at once: their heartbeats are written together, in batches
    with ThreadPoolExecutor(len(SIM)) as pool:
        for seen in pool.map(host_beats, SIM):
            assert seen == [1, 2, 3, 4, 5]


def test_an_acknowledged_heartbeat_is_in_redis_before_its_answer(c: Cluster) -> None:
    for seq in range(10_000, 10_030):
        assert post(c, "host-1", beat("host-1", seq)).status_code == 200
        assert json.loads(stored(c, "host-1")["hb"])["seq"] == seq


def test_an_unchanged_process_list_is_not_rewritten_and_a_change_is_written_at_once(c: Cluster) -> None:
    assert post(c, "host-2", beat("host-2", 20_000, [proc(cpu=11.0)])).status_code == 200
    assert json.loads(stored(c, "host-2")["procs"])[0]["cpu_percent"] == 11.0
    # the same processes, other figures: the beat is stored, the list kept (its figures refresh later)
    assert post(c, "host-2", beat("host-2", 20_001, [proc(cpu=22.0)])).status_code == 200
    after = stored(c, "host-2")
    assert json.loads(after["hb"])["seq"] == 20_001
    assert json.loads(after["procs"])[0]["cpu_percent"] == 11.0
    view = host_view(c, "host-2")
    assert view["seq"] == 20_001 and view["processes"][0]["state"] == "running"
    # a process restarted: written with the beat that says so, and shown
    assert post(c, "host-2", beat("host-2", 20_002, [proc("backoff", cpu=33.0, restarts=1)])).status_code == 200
    assert json.loads(stored(c, "host-2")["procs"])[0] == {**proc("backoff", 33.0, 1), "last_exit": None,
                                                           "check_latency_ms": None, "spare": None}
    view = host_view(c, "host-2")
    assert view["processes"][0]["state"] == "backoff" and view["processes"][0]["restarts"] == 1
    # no processes any more is a change too
    assert post(c, "host-2", beat("host-2", 20_003, [])).status_code == 200
    assert host_view(c, "host-2")["processes"] == []


def test_a_process_list_another_dispatcher_wrote_is_replaced_with_the_next_beat(c: Cluster) -> None:
    assert post(c, "host-1", beat("host-1", 30_000, [proc(cpu=5.0)])).status_code == 200
    # as if the agent had been at another dispatcher meanwhile, which stored another list
    with redis.Redis.from_url(c.redis.url) as r:
        r.hset(Keys(c.prefix).host("host-1"), mapping={"procs": "[]", "procs_key": "other"})
    assert post(c, "host-1", beat("host-1", 30_001, [proc(cpu=6.0)])).status_code == 200
    assert post(c, "host-1", beat("host-1", 30_002, [proc(cpu=7.0)])).status_code == 200
    assert json.loads(stored(c, "host-1")["procs"])[0]["cpu_percent"] == 7.0


def test_heartbeats_decoded_leniently_are_still_taken(c: Cluster) -> None:
    # msgspec is strict (a number as a string); such a heartbeat goes on to the pydantic route
    body = beat("host-1", 40_000)
    body["seq"] = "40000"
    assert post(c, "host-1", body).status_code == 200
    assert json.loads(stored(c, "host-1")["hb"])["seq"] == 40_000


def test_bad_heartbeats_are_refused_in_the_error_shape_and_counted(c: Cluster) -> None:
    before = c.state()["rejected"].get("heartbeat", 0)
    r = post(c, "host-1", b"{not json")
    assert r.status_code == 400 and r.json()["error"]
    r = post(c, "host-1", beat("host-1", 1, [proc(cpu=-1.0)]))
    assert r.status_code == 422 and "processes.0.cpu_percent" in r.json()["error"]
    r = post(c, "host-1", {**beat("host-1", 1), "surprise": 1})
    assert r.status_code == 422 and "surprise" in r.json()["error"]
    # another host's heartbeat with host-1's token; no token; a host the deployment does not know
    assert post(c, "host-1", beat("host-2", 1)).status_code == 403
    assert httpx.post(c.ops_url() + "/api/v1/heartbeat", json=beat("host-1", 1), timeout=10).status_code == 401
    wait_for("the refused heartbeats counted", lambda: c.state()["rejected"].get("heartbeat", 0) >= before + 3, 30)


def test_the_msgspec_decoder_takes_what_the_wire_model_takes() -> None:
    body = beat("host-1", 5, [proc(), {**proc(), "name": "b", "spare": {"state": "ready", "pid": 9}}],
                watchdog={"checker_alive": True, "guard_alive": True, "generation": 2},
                events=[{"id": "e1", "kind": "restart", "message": "m", "ts_ms": 1, "severity": "warning"}])
    raw = json.dumps(body).encode()
    fast = HEARTBEAT_DECODER.decode(raw)
    assert json.loads(msgspec.json.encode(fast)) == Heartbeat.model_validate_json(raw).model_dump(mode="json")
    for bad in ({**body, "seq": -1}, {**body, "host": ""}, {**body, "host": "x" * 65},
                {**body, "metrics": {**body["metrics"], "memory_percent": 101}},
                {**body, "processes": [{**proc(), "state": "sleeping"}]}, {**body, "extra": 1},
                {**body, "processes": [proc()] * 257}):
        with pytest.raises(msgspec.ValidationError):
            HEARTBEAT_DECODER.decode(json.dumps(bad).encode())
        with pytest.raises(ValueError):
            Heartbeat.model_validate_json(json.dumps(bad))


def changes(c: Cluster, since: str | None) -> StateChanges:
    r = httpx.get(c.ops_url() + "/api/v1/state/changes", params={"since": since} if since else {},
                  headers=c.auth("viewer"), timeout=10)
    assert r.status_code == 200, r.text
    return StateChanges.model_validate_json(r.content)


def test_the_feed_gives_the_changes_since_a_version_and_the_full_document_otherwise(c: Cluster) -> None:
    first = changes(c, None)
    assert first.full is not None and {h.name for h in first.full.hosts} == {"host-1", "host-2", *SIM}
    doc = apply_changes(None, first)
    time.sleep(0.3)  # past the window in which consoles share one build
    assert post(c, "host-2", beat("host-2", 50_000, [proc(cpu=1.0)])).status_code == 200
    later = wait_for("host-2's beat in the feed", lambda: (ch := changes(c, first.version)).changed.get("hosts")
                     and any(h.get("seq") == 50_000 for h in ch.changed["hosts"]) and ch, 30)
    assert later.full is None and later.version != first.version
    row = next(h for h in later.changed["hosts"] if h["name"] == "host-2")
    assert row["seq"] == 50_000 and "name" in row
    # applied, the document has every host in the full document's order, host-2 at its new beat
    now = apply_changes(doc, later)
    full = changes(c, "not-a-version-of-ours").full
    assert full is not None and [h["name"] for h in now["hosts"]] == [h.name for h in full.hosts]
    assert next(h for h in now["hosts"] if h["name"] == "host-2")["seq"] == 50_000
    assert set(now) == set(full.model_dump(mode="json"))
    for unknown in ("feedbeef:1", "x", f"{first.version.split(':')[0]}:99999999"):
        assert changes(c, unknown).full is not None
    r = httpx.get(c.ops_url() + "/api/v1/state/changes", timeout=10)
    assert r.status_code == 401 and r.json()["error"]


def test_heartbeats_are_stored_after_redis_lost_its_scripts(c: Cluster) -> None:
    # as after a restart or a failover to a replica without them: the batch loads the script again
    with redis.Redis.from_url(c.redis.url) as r:
        r.script_flush()
    assert post(c, "host-1", beat("host-1", 60_000)).status_code == 200
    assert json.loads(stored(c, "host-1")["hb"])["seq"] == 60_000

"""Audit entries, staff events and exception groups carry an envelope too: damage one, and the ops API still
answers 200 with the others, the damaged one is set aside once and named in a staff event, and
`ctops store verify` finds it; records written before envelopes are read and sealed."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from ctops.envelope import LUA_HASH_ENVELOPE, SHA1, Corrupt, seal_fields, unseal_fields
from ctops.keys import Keys
from ctops_tools.procs import ctops_argv
from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, events, wait_for


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("sealed"), redis_server, f"t{os.getpid()}:sealed", trainers=1)
    cluster.start_all()
    yield cluster
    cluster.stop()


def keys(c: Cluster) -> Keys:
    return Keys(prefix=c.prefix)


def raw(c: Cluster) -> redis.Redis:
    return redis.Redis.from_url(c.redis.url)


def cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ctops_argv(*args, "--config", str(c.config)), capture_output=True, text=True,
                          timeout=120, env={**os.environ, **c.env})


def verify(c: Cluster) -> dict:
    return json.loads(cli(c, "store", "verify", "--json").stdout)


def audit(c: Cluster) -> list[dict]:
    r = httpx.get(c.ops_url() + "/api/v1/audit", params={"limit": 1000}, headers=c.auth("viewer"), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def corrupt_events(c: Cluster, key: str) -> list[dict]:
    return [e for e in events(c) if e["kind"] == "record_corrupt" and e["target"] == key]


def staff_actions(c: Cluster, n: int) -> None:
    for i in range(n):
        action = "drain" if i % 2 == 0 else "enable"
        r = httpx.post(f"{c.ops_url()}/api/v1/servers/trainer-1/{action}", headers=c.auth("operator"), timeout=10)
        assert r.status_code == 200, r.text


def send_exception(c: Cluster, exc_type: str, n: int = 1) -> None:
    now = int(time.time() * 1000)
    evs = [{"event_id": uuid.uuid4().hex, "ts_ms": now + i, "service": "trainer", "host": "host-1",
            "type": exc_type, "message": f"{exc_type} number {i}",
            "frames": [{"filename": "trainer/app.py", "function": "handler", "module": "trainer.app",
                        "lineno": 10 + i, "in_app": True}]} for i in range(n)]
    r = httpx.post(c.ops_url() + "/api/v1/exceptions", json={"events": evs}, headers=c.auth("agent"), timeout=10)
    assert r.status_code == 200, r.text


def groups(c: Cluster) -> dict[str, dict]:
    r = httpx.get(c.ops_url() + "/api/v1/exceptions/groups", headers=c.auth("viewer"), timeout=10)
    assert r.status_code == 200, r.text
    return {g["type"]: g for g in r.json()["groups"]}


# --- the envelope a Redis script writes is the one Python checks, and back -------------------------

def test_a_hash_sealed_by_a_script_checks_in_python_and_back(redis_server: EmbeddedRedis, key_prefix: str) -> None:
    key = f"{key_prefix}:exc:group:abc"
    fields = {"id": "abc", "type": "KeyError", "message": "caf\u00e9 \u2603", "count": "7", "a_b": "", "ab": "x"}
    with redis.Redis.from_url(redis_server.url) as r:
        r.hset(key, mapping=fields)
        r.eval(LUA_HASH_ENVELOPE + "env_seal(KEYS[1], 'exc-group', 5) return 1", 1, key)
        got = unseal_fields(key, r.hgetall(key), "exc-group")
        assert got == (fields, 5, False)
        r.hset(key, "count", "8")  # a change the seal does not cover
        with pytest.raises(Corrupt):
            unseal_fields(key, r.hgetall(key), "exc-group")
        check = LUA_HASH_ENVELOPE + "local s, g = env_check(KEYS[1], 'exc-group') return {s, g}"
        assert r.eval(check, 1, key) == [b"damaged", 5]
        r.delete(key)
        r.hset(key, mapping=seal_fields(key, "exc-group", fields, 9, digest=SHA1))
        assert r.eval(check, 1, key) == [b"intact", 9]
        r.delete(key)
        # a group's usual fields only: the scripts take them in a fixed order instead of sorting
        usual = {"id": "abc", "type": "KeyError", "culprit": "app.handler", "status": "muted", "count": "3",
                 "first_ms": "1", "last_ms": "2", "message": "caf\u00e9", "mute_until_ms": "9", "assignee": "ada"}
        r.hset(key, mapping=usual)
        r.eval(LUA_HASH_ENVELOPE + "env_seal(KEYS[1], 'exc-group', 2) return 1", 1, key)
        assert unseal_fields(key, r.hgetall(key), "exc-group") == (usual, 2, False)
        r.delete(key)
        r.hset(key, mapping=seal_fields(key, "exc-group", usual, 4, digest=SHA1))
        assert r.eval(check, 1, key) == [b"intact", 4]
        r.hset(key, "status", "resolved")
        assert r.eval(check, 1, key) == [b"damaged", 4]
        r.delete(key)


# --- audit entries -------------------------------------------------------------------------------

def test_a_damaged_audit_entry_is_set_aside_and_the_others_are_served(c: Cluster) -> None:
    staff_actions(c, 5)
    k = keys(c).audit
    with raw(c) as r:
        assert all(b"_env" in f for _id, f in r.xrange(k))  # written sealed
    before = audit(c)
    done = cli(c, "chaos", "corrupt", k)
    assert done.returncode == 0 and "of entry" in done.stdout, done.stderr
    damaged_id = done.stdout.split("of entry ")[1].split()[0]
    report = verify(c)
    assert report["by_kind"]["audit"]["corrupt"] == 1
    assert [d["key"] for d in report["damaged"]] == [f"{k}#{damaged_id}"]
    after = audit(c)
    assert [a["id"] for a in after] == [a["id"] for a in before if a["id"] != damaged_id]
    assert all("_env" not in a for a in after)
    [event] = wait_for("a record_corrupt event naming the audit log", lambda: corrupt_events(c, k), 30)
    assert "damaged audit record" in event["message"] and damaged_id in event["message"]
    assert audit(c) == after and len(corrupt_events(c, k)) == 1  # counted once, not at every read
    with raw(c) as r:
        stats = r.hgetall(keys(c).quarantine_stats)
    assert int(stats[b"corrupt_found:audit"]) == 1
    assert verify(c)["by_kind"]["audit"]["corrupt"] == 0


def test_an_audit_entry_written_before_envelopes_is_read_and_sealed(c: Cluster) -> None:
    k = keys(c).audit
    with raw(c) as r:
        old_id = r.xadd(k, {"ts_ms": 1700000000000, "who": "alice", "role": "operator", "action": "drain",
                            "target": "trainer-1", "result": "ok", "via": "A"}).decode()
    staff_actions(c, 1)  # a newer, sealed entry after it
    assert next(a for a in audit(c) if a["id"] == old_id)["who"] == "alice"
    assert verify(c)["by_kind"]["audit"]["corrupt"] == 0
    fixed = cli(c, "store", "verify", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    with raw(c) as r:
        [(_id, fields)] = r.xrange(k, old_id, old_id)
        assert b"_env" in fields and fields[b"who"] == b"alice"
        assert all(b"_env" in f for _id, f in r.xrange(k))
    assert next(a for a in audit(c) if a["id"] == old_id)["who"] == "alice"


def test_an_audit_key_of_another_type_is_no_500(c: Cluster) -> None:
    k = keys(c).audit
    with raw(c) as r:
        saved = r.dump(k)
        r.delete(k)
        r.set(k, "not a stream")
    try:
        assert audit(c) == []
        wait_for("a record_corrupt event", lambda: [e for e in corrupt_events(c, k) if "type" in e["message"]], 30)
        staff_actions(c, 1)  # the log starts again
        assert [a["action"] for a in audit(c)] == ["drain"]
    finally:
        with raw(c) as r:
            if saved is None:  # there was no audit log yet (this test ran first)
                r.delete(k)
            else:
                r.restore(k, 0, saved, replace=True)


# --- exception groups ----------------------------------------------------------------------------

def test_a_damaged_exception_group_is_rebuilt_and_the_list_still_answers(c: Cluster) -> None:
    send_exception(c, "GroupOneError", 3)
    send_exception(c, "GroupTwoError", 2)
    listed = groups(c)
    gid = listed["GroupOneError"]["id"]
    key = keys(c).exc_group(gid)
    with raw(c) as r:
        assert r.hget(key, "_env").startswith(b"1:exc-group:")
    assert httpx.post(f"{c.ops_url()}/api/v1/exceptions/groups/{gid}/resolve", headers=c.auth("operator"),
                      timeout=10).status_code == 200
    done = cli(c, "chaos", "corrupt", key)
    assert done.returncode == 0, done.stderr
    report = verify(c)
    assert {d["key"] for d in report["damaged"]} == {key} and report["by_kind"]["exc-group"]["corrupt"] == 1
    after = groups(c)
    assert after["GroupTwoError"]["count"] == 2
    # rebuilt from its indexes: the count kept, the status back to unresolved so staff look again
    assert after["GroupOneError"]["id"] == gid and after["GroupOneError"]["count"] == 3
    assert after["GroupOneError"]["status"] == "unresolved"
    [event] = wait_for("a record_corrupt event naming the group", lambda: corrupt_events(c, key), 30)
    assert "damaged exc-group record" in event["message"] and "repaired" in event["message"]
    detail = httpx.get(f"{c.ops_url()}/api/v1/exceptions/groups/{gid}", headers=c.auth("viewer"), timeout=10)
    assert detail.status_code == 200 and len(detail.json()["recent"]) == 3
    send_exception(c, "GroupOneError", 1)  # ingest carries on with the rebuilt, sealed group
    assert groups(c)["GroupOneError"]["count"] == 4 and verify(c)["corrupt"] == 0
    assert len(corrupt_events(c, key)) == 1


def test_an_exception_group_damaged_in_a_way_the_ingest_script_trips_over(c: Cluster) -> None:
    send_exception(c, "TrippingError", 2)
    gid = groups(c)["TrippingError"]["id"]
    key = keys(c).exc_group(gid)
    with raw(c) as r:
        r.delete(key)
        r.rpush(key, "not a group")  # another type: every HGET in the script fails
    send_exception(c, "TrippingError", 1)  # 200, not 500: set aside, then ingested
    assert groups(c)["TrippingError"]["count"] == 3
    wait_for("a record_corrupt event", lambda: corrupt_events(c, key), 30)


def test_a_damaged_stored_event_is_skipped_and_the_group_detail_answers(c: Cluster) -> None:
    send_exception(c, "RecentError", 3)
    gid = groups(c)["RecentError"]["id"]
    with raw(c) as r:
        r.lset(f"{keys(c).exc_group(gid)}:recent", 1, b"\xff{not json")
    detail = httpx.get(f"{c.ops_url()}/api/v1/exceptions/groups/{gid}", headers=c.auth("viewer"), timeout=10)
    assert detail.status_code == 200 and len(detail.json()["recent"]) == 2


def test_an_exception_group_written_before_envelopes_is_read_and_sealed(c: Cluster) -> None:
    send_exception(c, "LegacyError", 2)
    gid = groups(c)["LegacyError"]["id"]
    key = keys(c).exc_group(gid)
    with raw(c) as r:
        r.hdel(key, "_env")
    assert groups(c)["LegacyError"]["count"] == 2
    with raw(c) as r:
        assert unseal_fields(key, r.hgetall(key), "exc-group")[2] is False  # sealed now
    assert verify(c)["corrupt"] == 0


# --- the staff event stream ------------------------------------------------------------------------

LEGACY_SOURCE = b"agent:before-sealing"


def test_a_damaged_event_is_set_aside_and_the_others_are_served(c: Cluster) -> None:
    k = keys(c).events
    staff_actions(c, 2)
    wait_for("a few events in the stream", lambda: len(events(c)) >= 3, 30)
    with raw(c) as r:
        assert all(b"_env" in f for _id, f in r.xrange(k) if f.get(b"source") != LEGACY_SOURCE)  # written sealed
        found_before = int(r.hget(keys(c).quarantine_stats, "corrupt_found:event") or 0)
    before = [e["id"] for e in events(c)]
    done = cli(c, "chaos", "corrupt", k)
    assert done.returncode == 0 and "of entry" in done.stdout, done.stderr
    damaged_id = done.stdout.split("of entry ")[1].split()[0]
    assert damaged_id in before
    assert verify(c)["by_kind"]["event"]["corrupt"] == 1
    # read from a cursor (the console's and webhooks' way), then the newest: both answer, without it
    older = [i for i in before if i < damaged_id]
    later = events(c, after=older[-1]) if older else events(c)
    assert damaged_id not in [e["id"] for e in later]
    after = [e["id"] for e in events(c)]
    assert damaged_id not in after and set(before) - {damaged_id} <= set(after)
    [event] = wait_for("a record_corrupt event naming the event stream", lambda: corrupt_events(c, k), 30)
    assert "damaged event record" in event["message"] and damaged_id in event["message"]
    events(c)
    assert len(corrupt_events(c, k)) == 1  # counted once, not at every read
    with raw(c) as r:
        assert int(r.hget(keys(c).quarantine_stats, "corrupt_found:event") or 0) == found_before + 1
    assert verify(c)["by_kind"]["event"]["corrupt"] == 0


def test_an_event_written_before_sealing_is_served_as_it_is(c: Cluster) -> None:
    k = keys(c).events
    with raw(c) as r:
        old_id = r.xadd(k, {"event_id": uuid.uuid4().hex, "ts_ms": 1700000000000, "kind": "server_down",
                            "severity": "warning", "source": LEGACY_SOURCE, "target": "trainer-1",
                            "message": "written before sealing"}).decode()
    staff_actions(c, 1)  # a newer, sealed event after it
    got = {e["id"]: e for e in events(c)}
    assert got[old_id]["message"] == "written before sealing" and got[old_id]["severity"] == "warning"
    assert verify(c)["by_kind"]["event"]["corrupt"] == 0
    # a repairing pass leaves it as it is (the stream is not rebuilt for it) and it is still served
    fixed = cli(c, "store", "verify", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert {e["id"]: e for e in events(c)}[old_id]["message"] == "written before sealing"


def test_chaos_corrupt_random_damages_an_audit_entry_or_a_group_that_verify_finds(c: Cluster) -> None:
    staff_actions(c, 3)
    send_exception(c, "RandomTargetError", 1)
    for kind in ("audit", "exc-group", "event"):
        before = verify(c)["by_kind"].get(kind, {}).get("corrupt", 0)
        done = cli(c, "chaos", "corrupt", "--random", kind)
        assert done.returncode == 0 and done.stdout.startswith("corrupt "), done.stderr
        assert verify(c)["by_kind"][kind]["corrupt"] == before + 1


def test_a_quarantined_audit_entry_is_put_back_as_a_new_entry_on_restore(c: Cluster) -> None:
    staff_actions(c, 3)
    k = keys(c).audit
    done = cli(c, "chaos", "corrupt", k)
    damaged_id = done.stdout.split("of entry ")[1].split()[0]
    audit(c)  # the read sets it aside
    with raw(c) as r:
        [item] = [f for _id, f in r.xrange(keys(c).quarantine_log) if f.get(b"entry", b"").decode() == damaged_id]
        assert not r.xrange(k, damaged_id, damaged_id)
    qid = item[b"qid"].decode()
    put_back = cli(c, "store", "quarantine", "restore", qid)
    assert put_back.returncode == 0, put_back.stderr
    with raw(c) as r:
        entries = r.xrange(k)
    # the damaged bytes are back, byte for byte, under a new id (a stream takes no older id), and
    # the restore itself is audited after it
    restored = [(i, f) for i, f in entries if b"\xff\xfe damaged" in f.values()]
    assert len(restored) == 1 and restored[0][0].decode() > damaged_id
    assert entries[-1][1][b"action"] == b"quarantine-restore"

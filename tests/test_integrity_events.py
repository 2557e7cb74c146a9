"""What a trainer set aside reaches staff: the leading dispatcher turns each quarantine entry into
one `record_corrupt` event naming the key, the kind and the learner's session."""

from __future__ import annotations

import httpx
import pytest
import redis

from ctops.keys import Keys
from tests.cluster import Cluster, events, wait_for

# each test counts the events and records of its own cluster
pytestmark = pytest.mark.own_cluster


def test_a_damaged_session_becomes_one_staff_event_naming_key_and_session(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    base = c.trainer_url("trainer-1")
    sid = httpx.post(base + "/api/sessions", json={"learner": "ada"}, timeout=30).json()["session_id"]
    key = Keys(prefix=c.prefix).session(sid)
    with redis.Redis.from_url(c.redis.url) as r:
        r.hset(key, "learner", b"\xff")
    for _ in range(3):
        assert httpx.get(f"{base}/api/sessions/{sid}", timeout=30).status_code == 410
    found = wait_for("a record_corrupt event", lambda: [e for e in events(c) if e["kind"] == "record_corrupt"], 30)
    [event] = found
    assert event["target"] == key and f"session {sid}" in event["message"] and "damaged session record" in \
        event["message"]
    assert event["severity"] == "critical"


def test_the_leaders_scrub_finds_damage_nobody_read(make_cluster) -> None:  # noqa: ANN001 - fixture
    c = make_cluster(timings={"scrub_interval_ms": 300})
    c.start_all()
    base = c.trainer_url("trainer-1")
    sid = httpx.post(base + "/api/sessions", json={"learner": "ada"}, timeout=30).json()["session_id"]
    key = Keys(prefix=c.prefix).session(sid)
    with redis.Redis.from_url(c.redis.url) as r:
        r.delete(key)
        r.rpush(key, "not a session")
    found = wait_for("the scrub's record_corrupt event",
                     lambda: [e for e in events(c) if e["kind"] == "record_corrupt" and e["target"] == key], 60)
    assert "scrub:A" in found[0]["message"] and "set aside" in found[0]["message"]
    with redis.Redis.from_url(c.redis.url, decode_responses=True) as r:
        stats = r.hgetall(Keys(prefix=c.prefix).quarantine_stats)
    assert int(stats["corrupt_found:session"]) == 1 and "last_scrub_ms" in stats
    r2 = httpx.get(f"{base}/api/sessions/{sid}", timeout=30)
    assert r2.status_code == 410 and r2.json()["error"] == "session_damaged"


def damaged_session(c: Cluster) -> tuple[str, str]:
    """A learner's session with one bad byte, read once by its trainer (410): set aside in the quarantine."""
    base = c.trainer_url("trainer-2")
    sid = httpx.post(base + "/api/sessions", json={}, timeout=30).json()["session_id"]
    key = Keys(prefix=c.prefix).session(sid)
    with redis.Redis.from_url(c.redis.url) as r:
        r.hset(key, "created_ms", b"\xc3\x28")
    assert httpx.get(f"{base}/api/sessions/{sid}", timeout=30).status_code == 410
    return sid, key


def test_staff_see_the_quarantine_and_discard_a_record_only_when_confirmed(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    sid, key = damaged_session(c)
    # `ctops status --json` shows the count (store.corrupt_found), from the dispatcher's store watch
    wait_for("store.corrupt_found", lambda: c.state()["store"]["corrupt_found"] == 1, 30)
    view = httpx.get(c.ops_url() + "/api/v1/store/integrity", headers=c.auth("viewer"), timeout=10).json()
    assert view["corrupt_found"] == 1 and view["repaired"] == 0
    [item] = view["quarantined"]
    assert item["key"] == key and item["session"] == sid
    url = f"{c.ops_url()}/api/v1/store/quarantine/{item['qid']}/discard"
    assert httpx.post(url, json={"confirm": item["qid"]}, headers=c.auth("viewer"), timeout=10).status_code == 403
    unconfirmed = httpx.post(url, json={"confirm": "yes"}, headers=c.auth("operator"), timeout=10)
    assert unconfirmed.status_code == 409 and "confirm" in unconfirmed.json()["detail"]
    done = httpx.post(url, json={"confirm": item["qid"]}, headers=c.auth("operator"), timeout=10)
    assert done.status_code == 200 and done.json()["key"] == key
    after = httpx.get(c.ops_url() + "/api/v1/store/integrity", headers=c.auth("viewer"), timeout=10).json()
    assert after["quarantined"] == []
    audit = httpx.get(c.ops_url() + "/api/v1/audit", headers=c.auth("viewer"), timeout=10).json()
    assert any(a["action"] == "quarantine-discard" and a["target"] == key and a["role"] == "operator" for a in audit)


def test_staff_put_a_quarantined_record_back_through_the_ops_api(running_dispatcher: Cluster) -> None:
    """Restore through the dispatcher (the console's `R`): its Redis user may RESTORE a payload it
    DUMPed under its own prefix; the damaged bytes come back exactly, audited."""
    c = running_dispatcher
    _sid, key = damaged_session(c)
    view = wait_for("the quarantine entry", lambda: [q for q in httpx.get(
        c.ops_url() + "/api/v1/store/integrity", headers=c.auth("viewer"), timeout=10).json()["quarantined"]
        if q["key"] == key], 30)
    qid = view[0]["qid"]
    url = f"{c.ops_url()}/api/v1/store/quarantine/{qid}/restore"
    done = httpx.post(url, json={"confirm": qid}, headers=c.auth("operator"), timeout=10)
    assert done.status_code == 200, done.text
    assert done.json()["action"] == "restore" and done.json()["key"] == key
    with redis.Redis.from_url(c.redis.url) as r:
        assert r.hget(key, "created_ms") == b"\xc3\x28"  # the damaged bytes, exactly as they were
    audit = httpx.get(c.ops_url() + "/api/v1/audit", headers=c.auth("viewer"), timeout=10).json()
    assert any(a["action"] == "quarantine-restore" and a["target"] == key and a["role"] == "operator"
               for a in audit)


def test_damaged_llm_controls_are_repaired_from_the_last_intact_copy(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    key = Keys(prefix=c.prefix).llm_control
    r = httpx.post(c.ops_url() + "/api/v1/llm/providers/secondary/pin", headers=c.auth("operator"), timeout=10)
    assert r.status_code == 200, r.text
    wait_for("the pin to be applied", lambda: httpx.get(c.ops_url() + "/api/v1/llm/providers", timeout=10,
                                                        headers=c.auth("viewer")).json()["pinned"] == "secondary")
    with redis.Redis.from_url(c.redis.url) as rr:
        rr.hset(key, "pin", b"sec\xffondary")
    found = wait_for("a record_corrupt event", lambda: [e for e in events(c) if e["kind"] == "record_corrupt"
                                                        and e["target"] == key], 30)
    assert "llm-control" in found[0]["message"] and "repaired" in found[0]["message"]
    with redis.Redis.from_url(c.redis.url) as rr:
        assert rr.hget(key, "pin") == b"secondary"
    view = httpx.get(c.ops_url() + "/api/v1/llm/providers", headers=c.auth("viewer"), timeout=10).json()
    assert view["pinned"] == "secondary"


def test_a_damaged_staff_state_is_rewritten_from_what_routing_applies(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    r = httpx.post(c.ops_url() + "/api/v1/servers/trainer-2/drain", headers=c.auth("operator"), timeout=10)
    assert r.status_code == 200, r.text
    key = Keys(prefix=c.prefix).server("trainer-2")
    for damage in (b"\xff\xfe", b"banana"):
        with redis.Redis.from_url(c.redis.url) as rr:
            rr.hset(key, "admin", damage)
            wait_for("the state to be rewritten", lambda rr=rr: rr.hget(key, "admin") == b"draining", 30)
    found = [e for e in events(c) if e["kind"] == "record_corrupt" and e["target"] == key]
    wait_for("two record_corrupt events", lambda: len([e for e in events(c) if e["kind"] == "record_corrupt"
                                                       and e["target"] == key]) == 2, 30)
    assert all("admin-state" in e["message"] for e in found)
    server = next(s for s in c.state()["servers"] if s["name"] == "trainer-2")
    assert server["admin"] == "draining"

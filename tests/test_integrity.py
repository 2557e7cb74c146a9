"""Damaged records in Redis, as a user would damage them, against real `ctops trainer` processes:
no 500, the learner gets a repaired answer or a clear error, the damage is set aside and logged
once (naming the key and the session), and other learners are not affected."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ctops.integrity import seal_json
from ctops.redisacl import glob_escape
from ctops_tools.procs import ctops_argv
from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, wait_for
from tests.trainer_cluster import (
    GOOD,
    SLOW_GOOD,
    STEPS,
    keys,
    new_session,
    poll_done,
    post,
    rclient,
    sandbox_runs,
    step_names,
    stored,
    trainer_cluster,
    wait_until_up,
)
from trainer.work import MAX_TAKEOVERS

TOML = """
[sandbox]
wall_seconds = 10
[trainer]
lease_ttl_ms = 1500
scan_interval_ms = 300
"""
GARBAGE = b"\x00garbage \xff\xfe not a checkpoint"


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    yield from trainer_cluster(tmp_path_factory.mktemp("integrity"), redis_server, TOML)


def raw(c: Cluster) -> redis.Redis:
    return rclient(c, decode=False)


def quarantined(c: Cluster, key: str) -> list[dict]:
    """The quarantine log's entries naming `key` (what the dispatcher leader turns into events)."""
    with rclient(c) as r:
        return [fields for _id, fields in r.xrange(keys(c).quarantine_log) if fields["key"] == key]


def other_learner_ok(c: Cluster) -> None:
    """Another learner, on both servers, is unaffected."""
    for name in c.server_names:
        if name not in c.children or c.children[name].proc.poll() is not None:
            continue
        base = c.trainer_url(name)
        sid = new_session(base)
        r = post(base, sid, GOOD)
        assert r.status_code == 202, r.text
        done = poll_done(base, sid, r.json()["submission_id"])
        assert done["verdict"] == "passed"
        assert httpx.get(f"{base}/api/sessions/{sid}", timeout=30).status_code == 200


def done_submission(c: Cluster) -> tuple[str, str, str]:
    base = c.trainer_url("trainer-1")
    sid = new_session(base)
    sub_id = post(base, sid, GOOD).json()["submission_id"]
    poll_done(base, sid, sub_id)
    return base, sid, sub_id


def test_bad_byte_in_a_session_hash_is_a_clear_410_counted_once(c: Cluster) -> None:
    base = c.trainer_url("trainer-1")
    sid = new_session(base)
    key = keys(c).session(sid)
    with raw(c) as r:
        r.hset(key, "learner", b"ad\xffa")
    for name in c.server_names:  # every server, every time: the same clear answer, no 500
        for _ in range(2):
            resp = httpx.get(f"{c.trainer_url(name)}/api/sessions/{sid}", timeout=30)
            assert resp.status_code == 410, resp.text
            assert resp.json()["error"] == "session_damaged" and resp.json()["next"] == "POST /api/sessions"
    resp = post(base, sid, GOOD)
    assert resp.status_code == 410 and resp.json()["error"] == "session_damaged"
    [entry] = quarantined(c, key)
    assert entry["kind"] == "session" and entry["session"] == sid and entry["reason"] == "encoding"
    with raw(c) as r:
        item = r.hgetall(keys(c).quarantine_item(entry["qid"]))
        # the damaged bytes are kept, restorable as they were
        assert b"ad\xffa" in item[b"dump"]
    other_learner_ok(c)


def test_a_session_key_of_the_wrong_type_is_a_clear_410(c: Cluster) -> None:
    base = c.trainer_url("trainer-2")
    sid = new_session(base)
    key = keys(c).session(sid)
    with raw(c) as r:
        r.delete(key)
        r.set(key, "not a hash")
    resp = httpx.get(f"{base}/api/sessions/{sid}", timeout=30)
    assert resp.status_code == 410 and resp.json()["error"] == "session_damaged", resp.text
    [entry] = quarantined(c, key)
    assert entry["reason"] == "type" and entry["session"] == sid
    other_learner_ok(c)


def test_garbage_in_a_finished_checkpoint_is_repaired_from_a_previous_copy(c: Cluster) -> None:
    base, sid, sub_id = done_submission(c)
    before = stored(c, sub_id)
    key = keys(c).submission(sub_id)
    with raw(c) as r:
        r.set(key, GARBAGE)
    got = httpx.get(f"{base}/api/sessions/{sid}/submissions/{sub_id}", timeout=30)
    assert got.status_code == 200 and got.json() == before
    view = httpx.get(f"{base}/api/sessions/{sid}", timeout=30)
    assert view.status_code == 200 and view.json()["submissions"] == [before]
    [entry] = quarantined(c, key)
    assert entry["outcome"] == "repaired" and entry["session"] == sid and entry["kind"] == "submission"
    assert stored(c, sub_id) == before
    other_learner_ok(c)


def test_a_checkpoint_with_no_intact_copy_is_a_clear_410_and_the_session_view_still_works(c: Cluster) -> None:
    base, sid, sub_id = done_submission(c)
    key = keys(c).submission(sub_id)
    with raw(c) as r:
        r.set(key, GARBAGE)
        r.delete(keys(c).submission_history(sub_id))
    view = httpx.get(f"{base}/api/sessions/{sid}", timeout=30)
    assert view.status_code == 200, view.text
    [sub] = view.json()["submissions"]
    assert sub["status"] == "failed" and "submit your code again" in sub["message"]
    got = httpx.get(f"{base}/api/sessions/{sid}/submissions/{sub_id}", timeout=30)
    assert got.status_code == 410 and got.json()["error"] == "submission_damaged", got.text
    assert len(quarantined(c, key)) == 1
    other_learner_ok(c)


def kill_while_running(c: Cluster) -> tuple[str, str]:
    t1 = c.trainer_url("trainer-1")
    sid = new_session(t1)
    sub_id = post(t1, sid, SLOW_GOOD).json()["submission_id"]
    wait_for("the tests to be running on trainer-1", lambda: stored(c, sub_id)["status"] == "running")
    c.signal("trainer-1", signal.SIGKILL)
    c.children["trainer-1"].proc.wait(30)
    return sid, sub_id


def restart_trainer_1(c: Cluster) -> None:
    c.start("trainer-1")
    wait_until_up(c, "trainer-1")


def test_garbage_checkpoint_with_its_trainer_dead_is_contained_once_not_retried_forever(c: Cluster) -> None:
    sid, sub_id = kill_while_running(c)
    key = keys(c).submission(sub_id)
    try:
        with raw(c) as r:
            r.set(key, GARBAGE)
            r.delete(keys(c).submission_history(sub_id))
        t2 = c.trainer_url("trainer-2")
        for _ in range(10):  # the learner keeps polling: a clear answer each time, never a 500
            got = httpx.get(f"{t2}/api/sessions/{sid}/submissions/{sub_id}", timeout=30)
            assert got.status_code == 410 and got.json()["error"] == "submission_damaged", got.text
        with rclient(c) as r:
            assert r.zscore(keys(c).submissions_open, sub_id) is None
        # several scan passes later it is still contained once: no server keeps taking it over
        time.sleep(2)  # several scan passes (300 ms apart), each of which would have taken it over again
        assert len(quarantined(c, key)) == 1
        other_learner_ok(c)
    finally:
        restart_trainer_1(c)


def test_a_checkpoint_damaged_mid_submission_resumes_from_the_previous_generation_once(c: Cluster) -> None:
    runs = sandbox_runs(c)
    sid, sub_id = kill_while_running(c)
    key = keys(c).submission(sub_id)
    try:
        with raw(c) as r:
            r.set(key, GARBAGE)
        done = poll_done(c.trainer_url("trainer-2"), sid, sub_id)
        assert step_names(done) == STEPS and done["verdict"] == "passed", done["steps"]
        # the killed run and the resumed one; the resumed one completed once
        assert sandbox_runs(c) == runs + 2
        [entry] = quarantined(c, key)
        assert entry["outcome"] == "repaired"
    finally:
        restart_trainer_1(c)


def test_garbage_in_a_stored_idempotency_outcome_is_a_clear_410_for_that_key_only(c: Cluster) -> None:
    base = c.trainer_url("trainer-1")
    sid = new_session(base)
    headers = {"Idempotency-Key": "integrity-test-1"}
    first = post(base, sid, GOOD, headers)
    assert first.status_code == 202
    rkey = keys(c).idempotency(hashlib.sha256(b"integrity-test-1").hexdigest())
    with raw(c) as r:
        r.set(rkey, b'{"state": "done", "fingerprint": ' + GARBAGE)
    for name in c.server_names:
        again = post(c.trainer_url(name), sid, GOOD, headers)
        assert again.status_code == 410, again.text
        assert again.json()["error"] == "idempotency_outcome_damaged"
    assert len(quarantined(c, rkey)) == 1
    # the submission itself is intact and a new key works
    poll_done(base, sid, first.json()["submission_id"])
    assert post(base, sid, GOOD, {"Idempotency-Key": "integrity-test-2"}).status_code == 202
    other_learner_ok(c)


def test_records_written_before_envelopes_are_read_and_upgraded(c: Cluster) -> None:
    base, sid, sub_id = done_submission(c)
    before = stored(c, sub_id)
    with rclient(c) as r:
        # what the previous release wrote: a plain hash and plain JSON
        r.delete(keys(c).session(sid))
        r.hset(keys(c).session(sid), mapping={"session_id": sid, "learner": "ada", "created_ms": 1,
                                              "created_by": "old", "last_activity_ms": 1, "last_server": "old"})
        r.set(keys(c).submission(sub_id), json.dumps(before))
    view = httpx.get(f"{base}/api/sessions/{sid}", timeout=30)
    assert view.status_code == 200 and view.json()["learner"] == "ada"
    assert view.json()["submissions"] == [before]
    with rclient(c) as r:
        assert "_env" in r.hgetall(keys(c).session(sid))  # sealed by the touch that followed
    assert not quarantined(c, keys(c).session(sid))


def cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ctops_argv(*args, "--config", str(c.config)), capture_output=True, text=True,
                          timeout=120, env={**os.environ, **c.env})


def test_store_verify_finds_damage_nobody_read_and_repair_contains_it(c: Cluster) -> None:
    base, sid, sub_id = done_submission(c)
    key = keys(c).submission(sub_id)
    session_key = keys(c).session(sid)
    for k in (key, session_key):
        r = cli(c, "chaos", "corrupt", k)
        assert r.returncode == 0 and f"corrupt {k}" in r.stdout, r.stderr
    found = cli(c, "store", "verify", "--json")
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    damaged = {d["key"]: d for d in report["damaged"]}
    assert damaged[key]["result"] == "corrupt" and damaged[session_key]["result"] == "corrupt"
    assert report["by_kind"]["submission"]["corrupt"] >= 1 and report["checked"] >= 2
    assert not quarantined(c, key)  # verify alone changes nothing
    fixed = cli(c, "store", "verify", "--repair", "--json")
    report = json.loads(fixed.stdout)
    damaged = {d["key"]: d for d in report["damaged"]}
    assert damaged[key]["result"] == "repaired" and damaged[session_key]["result"] == "quarantined"
    assert quarantined(c, key)[0]["reader"] == "ctops store verify"
    again = cli(c, "store", "verify", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["corrupt"] == 0, again.stdout
    got = httpx.get(f"{base}/api/sessions/{sid}", timeout=30)
    assert got.status_code == 410 and got.json()["error"] == "session_damaged"
    # staff discard the quarantined session record: audited, and gone from the list
    qid = quarantined(c, session_key)[0]["qid"]
    assert qid in cli(c, "store", "quarantine", "list").stdout
    assert cli(c, "store", "quarantine", "discard", qid).returncode == 0
    assert qid not in cli(c, "store", "quarantine", "list").stdout
    with rclient(c) as r:
        audit = r.xrevrange(keys(c).audit, count=1)[0][1]
    assert audit["action"] == "quarantine-discard" and audit["target"] == session_key


def test_backup_under_load_then_wipe_and_restore_brings_back_every_acknowledged_record(
        c: Cluster, tmp_path: Path) -> None:
    acked = [done_submission(c)[1:] for _ in range(3)]
    stop = threading.Event()
    during: list[tuple[str, str]] = []

    def load() -> None:
        while not stop.is_set():
            during.append(done_submission(c)[1:])

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for("load to run", lambda: len(during) >= 1, 60)
        acked += list(during)
        path = tmp_path / "state.ctb"
        b = cli(c, "store", "backup", str(path))
        assert b.returncode == 0, b.stderr
    finally:
        stop.set()
        t.join(120)
    expected = {sub_id: stored(c, sub_id) for _sid, sub_id in acked}
    # a damaged file and a non-empty store are refused, with a clear message
    bad = tmp_path / "bad.ctb"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    bad.write_bytes(bytes(data))
    refused = cli(c, "store", "restore", str(bad))
    assert refused.returncode == 1 and "damaged" in refused.stderr
    busy = cli(c, "store", "restore", str(path))
    assert busy.returncode == 1 and "already holds keys" in busy.stderr
    with raw(c) as r:  # every record gone
        for k in list(r.scan_iter(match=glob_escape(c.prefix) + ":*", count=1000)):
            r.delete(k)
    restored = cli(c, "store", "restore", str(path))
    assert restored.returncode == 0, restored.stderr
    for sid, sub_id in acked:
        base = c.trainer_url("trainer-2")
        view = httpx.get(f"{base}/api/sessions/{sid}", timeout=30)
        assert view.status_code == 200, view.text
        assert any(s["submission_id"] == sub_id for s in view.json()["submissions"])
        assert stored(c, sub_id) == expected[sub_id]


def test_work_that_keeps_failing_is_marked_failed_after_a_bounded_number_of_takeovers(c: Cluster) -> None:
    base = c.trainer_url("trainer-1")
    sid = new_session(base)
    sub_id = "sub_poisoned"
    key = keys(c).submission(sub_id)
    # intact as a record, but no server can work on it (an exercise this build does not have)
    sub = {"submission_id": sub_id, "session_id": sid, "exercise_id": "no-such-exercise", "status": "received",
           "code": GOOD, "steps": [], "tests": [], "created_ms": 1}
    with raw(c) as r:
        r.set(key, seal_json(key, "submission", sub, 1))
        r.rpush(keys(c).session_submissions(sid), sub_id)
        r.zadd(keys(c).submissions_open, {sub_id: 1})
    done = wait_for("the submission to be given up", lambda: (s := stored(c, sub_id))["status"] == "failed" and s, 60)
    assert done["failed_reason"] == f"taken over {MAX_TAKEOVERS} times without finishing"
    got = httpx.get(f"{base}/api/sessions/{sid}/submissions/{sub_id}", timeout=30)
    assert got.status_code == 200 and got.json()["status"] == "failed" and "submit your code again" in \
        got.json()["message"]
    with rclient(c) as r:
        assert r.zscore(keys(c).submissions_open, sub_id) is None


def test_chaos_corrupt_random_damages_one_record_that_verify_finds(c: Cluster) -> None:
    done_submission(c)
    before = json.loads(cli(c, "store", "verify", "--json").stdout)["corrupt"]
    r = cli(c, "chaos", "corrupt", "--random", "submission")
    assert r.returncode == 0 and r.stdout.startswith("corrupt "), r.stderr
    damaged_key = r.stdout.split()[1].rstrip(":")
    report = json.loads(cli(c, "store", "verify", "--json").stdout)
    assert report["corrupt"] == before + 1 and damaged_key in {d["key"] for d in report["damaged"]}
    assert cli(c, "chaos", "corrupt", "--random", "nonsense").returncode == 2

"""The shared state is locked and duplicated: ACL users per role, a primary with two replicas and
three Sentinels, and every process follows the primary through a failover (real processes, SIGKILL)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from ctops import redisconn
from ctops.config import RedisSettings
from ctops.keys import Keys
from ctops_tools.procs import pid_alive
from ctops_tools.redis_embed import EmbeddedRedis, EmbeddedStore
from tests.cluster import Cluster, wait_for

ADMIN_COMMANDS = [("CONFIG", "SET", "dir", "/tmp"), ("SAVE",), ("BGSAVE",), ("FLUSHALL",), ("FLUSHDB",),
                  ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "127.0.0.1", "1"),
                  ("ACL", "SETUSER", "x", "on"), ("MODULE", "LIST"), ("KEYS", "*"), ("MONITOR",)]


def service_client(node: EmbeddedRedis, users: dict[str, str], role: str) -> redis.Redis:
    settings = RedisSettings.model_validate({"url": f"redis://{node.address}/0", "users": {
        role: {"username": users[role], "password_env": f"T_{role.upper()}_PW"}}})
    os.environ[f"T_{role.upper()}_PW"] = getattr(node.secrets, role)
    return redisconn.sync_client(settings, role, decode_responses=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("role", ["trainer", "dispatcher"])
def test_service_users_cannot_run_admin_commands_or_touch_foreign_keys(
        redis_server: EmbeddedRedis, key_prefix: str, role: str) -> None:
    users = redis_server.add_service_users(key_prefix, f"acl-{role}")
    with service_client(redis_server, users, role) as r:
        assert r.set(f"{key_prefix}:session:s1", "x") and r.get(f"{key_prefix}:session:s1") == "x"
        for cmd in ADMIN_COMMANDS:
            with pytest.raises(NoPermissionError):
                r.execute_command(*cmd)
        with pytest.raises(NoPermissionError):  # another cluster's keys
            r.set("someone-else:session:s1", "x")
        with pytest.raises(ResponseError, match="permission|access"):  # also from inside a script
            r.eval("return redis.call('SET', 'someone-else:x', '1')", 0)
        if role == "trainer":
            # the leader lease, staff states and the audit log are out of a trainer's reach
            for key in ("leader", "leader:epoch", "server:trainer-1", "audit", "llm:control"):
                with pytest.raises(NoPermissionError):
                    r.set(f"{key_prefix}:{key}", "trainer-1|999")
            assert r.zadd(f"{key_prefix}:server:trainer-1:sessions", {"s1": 1}) == 1
    with redis_server.admin() as admin:  # nothing was changed by the refused commands
        assert admin.config_get("dir")["dir"] != "/tmp"
        assert admin.exists(f"{key_prefix}:session:s1") == 1


def test_no_password_no_access(redis_server: EmbeddedRedis) -> None:
    with redis.Redis(host=redis_server.host, port=redis_server.port) as anon:
        with pytest.raises(AuthenticationError):  # NOAUTH: the default user is off
            anon.get("x")
    with redis.Redis(host=redis_server.host, port=redis_server.port, password="guess") as guess:
        with pytest.raises(AuthenticationError):
            guess.ping()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path / "store").start()
    yield s
    s.stop()


def test_topology_starts_authenticated(store: EmbeddedStore) -> None:
    roles = {n["name"]: n["role"] for n in store.describe()}
    assert roles == {"redis-1": "primary", "redis-2": "replica", "redis-3": "replica",
                     "sentinel-1": "sentinel", "sentinel-2": "sentinel", "sentinel-3": "sentinel"}
    # replication runs as its own ACL user: both replicas are in sync with the primary
    with store.nodes[0].admin(decode_responses=True) as r:
        assert r.info("replication")["connected_slaves"] == 2
    for node in store.nodes[1:]:
        with node.admin(decode_responses=True) as r:
            assert r.info("replication")["master_link_status"] == "up"
    for s in store.sentinels:
        with redis.Redis(host=s.host, port=s.port) as anon, pytest.raises((AuthenticationError, ResponseError)):
            anon.execute_command("SENTINEL", "MASTERS")
        with s.client() as c:  # Sentinels log in to the nodes and to each other
            m = c.sentinel_master(store.service)
            assert (m["num-slaves"], m["num-other-sentinels"], m["flags"]) == (2, 2, "master")
    for n in store.nodes:
        with redis.Redis(host=n.host, port=n.port) as anon, pytest.raises(AuthenticationError):
            anon.get("x")


def test_primary_killed_under_learner_load_no_learner_request_fails(tmp_path: Path, store: EmbeddedStore) -> None:
    (tmp_path / "c").mkdir()
    c = Cluster(tmp_path / "c", store, "ha", trainers=2,
                timings={"health_interval_ms": 200, "health_timeout_ms": 300})
    try:
        c.start_all()
        # the processes reach the store through the Sentinels, as the ACL'd service users
        assert "sentinels = [" in c.config.read_text()
        results: list[tuple[float, int, str]] = []
        stop = threading.Event()

        def learner() -> None:
            with httpx.Client(base_url=c.data_url(), timeout=60) as http:
                while not stop.is_set():
                    r = http.post("/api/sessions", json={"learner": "ada"})
                    if r.status_code == 201:
                        sid = r.json()["session_id"]
                        r = http.get(f"/api/sessions/{sid}")
                    results.append((time.monotonic(), r.status_code, r.text[:200]))

        threads = [threading.Thread(target=learner) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for("learners served", lambda: len(results) > 20)
        old = store.primary()
        old.proc.kill()  # type: ignore[union-attr]
        killed_at = time.monotonic()
        wait_for("a replica promoted", lambda: store.primary() is not old, timeout=30)
        new = store.primary()
        wait_for("learners served after the failover",
                 lambda: sum(1 for t, code, _ in results if t > killed_at + 3 and code == 200) > 20, timeout=60)
        stop.set()
        for t in threads:
            t.join(60)
        failed = [r for r in results if r[1] != 200]
        assert failed == [], failed[:5]
        assert not pid_alive(old.pid or 0) or old.proc is None or old.proc.poll() is not None
        # what learners created after the kill is on the new primary, written by the trainers' own user
        with new.admin(decode_responses=True) as r:
            clients = r.execute_command("CLIENT", "LIST")
        users = set(re.findall(r"user=(\S+)", clients if isinstance(clients, str) else str(clients)))
        assert set(c.redis_users.values()) <= users, users
        for name in ("A", "trainer-1", "trainer-2"):
            log = c.log(name)
            for bad in ("Traceback", "ReadOnlyError", "MasterNotFoundError", "ConnectionError"):
                assert bad not in log, f"{name}: {bad}\n{log[-2000:]}"
    finally:
        c.stop()


def epoch_of(c: Cluster, d: str) -> int:
    return next(x["epoch"] for x in c.state(d)["dispatchers"] if x["name"] == d)


def test_epoch_never_goes_backwards_when_the_store_loses_it(make_cluster) -> None:
    c: Cluster = make_cluster(dispatchers=("A", "B"))
    c.start_all()
    lead = wait_for("a leader", lambda: c.state("A")["leader"])
    before = wait_for("an epoch", lambda: epoch_of(c, lead))
    k = Keys(c.prefix)
    with redis.Redis.from_url(c.redis.url) as r:
        # what a failover that lost the newest writes leaves: no lease, an older epoch
        r.delete(k.leader)
        r.set(k.epoch, 0)
    wait_for("a new term", lambda: c.state("A")["leader"] and max(epoch_of(c, "A"), epoch_of(c, "B")) != before)
    lead = wait_for("a leader", lambda: c.state("A")["leader"])
    assert epoch_of(c, lead) > before
    with redis.Redis.from_url(c.redis.url) as r:
        assert int(r.get(k.epoch)) > before


def test_no_new_leader_until_a_replica_has_the_epoch(tmp_path: Path) -> None:
    # writes are not refused here (min-replicas-to-write 0), so only the lease's own WAIT can hold B back
    store = EmbeddedStore(tmp_path / "store", min_replicas=0).start()
    (tmp_path / "c").mkdir()
    c = Cluster(tmp_path / "c", store, "ha-epoch", trainers=1, dispatchers=("A", "B"))
    try:
        c.start_all()
        old = wait_for("a leader", lambda: c.state("A")["leader"])
        new = "B" if old == "A" else "A"
        replicas = [n for n in store.nodes if n is not store.primary()]
        for n in replicas:
            n.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        c.signal(old, signal.SIGKILL)
        deadline = time.monotonic() + 4  # the lease's TTL is 1 s: without WAIT, B leads within ~1.3 s
        while time.monotonic() < deadline:
            st = c.state(new)
            role = next(x["role"] for x in st["dispatchers"] if x["name"] == new)
            assert st["leader"] != new and role != "leader", "a term started with its epoch on no replica"
            time.sleep(0.1)
        for n in replicas:
            n.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        wait_for(f"{new} leads once a replica confirms", lambda: c.state(new)["leader"] == new)
    finally:
        c.stop()
        store.stop()


def test_writes_wait_for_a_replica_learner_refused_staff_kept(tmp_path: Path) -> None:
    # min-replicas-to-write 0: Redis itself would accept everything; only WAIT tells the difference
    store = EmbeddedStore(tmp_path / "store", min_replicas=0).start()
    (tmp_path / "c").mkdir()
    c = Cluster(tmp_path / "c", store, "ha-wait", trainers=1)
    try:
        c.start_all()
        base = c.trainer_url("trainer-1")
        r = httpx.post(base + "/api/sessions", json={"learner": "ada"}, timeout=30)
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        k = Keys(c.prefix)
        replica_has = [n for n in store.nodes if n is not store.primary() and n.admin().exists(k.session(sid))]
        assert replica_has, "an acknowledged session is on no replica"
        replicas = [n for n in store.nodes if n is not store.primary()]
        for n in replicas:
            n.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            # a learner is told to retry instead of getting a session a failover could lose
            r = httpx.post(base + "/api/sessions", json={"learner": "bob"}, timeout=30)
            assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
            with store.primary().admin() as admin:  # and staff can see it happened
                assert int(admin.get(k.store_writes_unconfirmed) or 0) >= 1
            # a staff action is kept (not undone behind the operator's back) and reported
            r = httpx.post(c.ops_url() + "/api/v1/servers/trainer-1/drain", headers=c.auth("operator"), timeout=30)
            assert r.status_code == 200, r.text
            wait_for("the unconfirmed write reported", lambda: "no replica confirmed it" in c.log("A"))
        finally:
            for n in replicas:
                n.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        r = wait_for("sessions again", lambda: (x := httpx.post(base + "/api/sessions", json={}, timeout=30))
                     .status_code == 201 and x)
        assert r.json()["session_id"]
    finally:
        c.stop()
        store.stop()


def test_store_started_again_on_its_workdir_comes_back_as_it_was_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = EmbeddedStore(tmp_path / "store", prefix="rs").start()
    for var, value in first.secrets.env().items():
        monkeypatch.setenv(var, value)
    settings = RedisSettings.model_validate(
        {"prefix": "rs", "sentinels": first.sentinel_addresses, "sentinel_password_env": "CTOPS_SENTINEL_PASSWORD",
         "users": {"admin": {"username": "ctops-admin", "password_env": "CTOPS_REDIS_ADMIN_PASSWORD"}}})
    try:
        with first.primary().admin() as r:
            r.set("rs:session:before", "1")
        first.nodes[0].proc.kill()  # type: ignore[union-attr]
        # through the Sentinels, as the processes write: waits until the promoted node takes writes
        with redisconn.sync_client(settings, "admin") as r:
            r.set("rs:session:after", "2")
            assert r.execute_command("WAIT", 1, 5000) >= 1
        promoted = first.primary()
        assert promoted is not first.nodes[0]
        ports = [n.port for n in [*first.nodes, *first.sentinels]]
    finally:
        first.stop()
    again = EmbeddedStore(tmp_path / "store", prefix="rs").start()
    try:
        assert again.restarted and [n.port for n in [*again.nodes, *again.sentinels]] == ports
        # the Sentinels' rewritten view: the promoted node is still the primary, the old one follows it
        assert again.primary().name == promoted.name
        with again.primary().admin() as r:
            assert (r.get("rs:session:before"), r.get("rs:session:after")) == (b"1", b"2")
        wait_for("the old primary back as a replica", lambda: again.nodes[0].admin(decode_responses=True)
                 .info("replication").get("master_link_status") == "up", timeout=60)
        with again.nodes[0].admin() as r:
            assert r.get("rs:session:after") == b"2"
    finally:
        again.stop()


def test_redis_settings_sentinel_url_and_missing_password_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctops.config import ConfigError

    s = RedisSettings.model_validate({"url": "redis+sentinel://127.0.0.1:26379,127.0.0.2/ctops-svc/2"})
    assert (s.sentinels, s.service, s.db, s.acks_needed) == (["127.0.0.1:26379", "127.0.0.2:26379"], "ctops-svc", 2, 1)
    assert RedisSettings().acks_needed == 0  # one node: nothing to wait for
    s = RedisSettings.model_validate({"users": {"trainer": {"username": "t", "password_env": "NO_SUCH_PW_VAR"}}})
    monkeypatch.delenv("NO_SUCH_PW_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_PW_VAR"):
        redisconn.async_client(s, "trainer")


@pytest.mark.parametrize("fault", ["kill", "freeze-6s"])
def test_acknowledged_writes_survive_a_primary_fault_with_one_leader(tmp_path: Path, store: EmbeddedStore,
                                                                     fault: str) -> None:
    """Every session a learner was told exists (201) before, during and after the primary's fault is
    still there afterwards; a staff drain set before it stays; exactly one dispatcher leads; a frozen
    old primary, thawed, rejoins as a replica."""
    (tmp_path / "c").mkdir()
    c = Cluster(tmp_path / "c", store, "hafault", trainers=2, dispatchers=("A", "B"),
                timings={"health_interval_ms": 200, "health_timeout_ms": 300})
    try:
        c.start_all()
        r = httpx.post(c.ops_url() + "/api/v1/servers/trainer-2/drain", headers=c.auth("operator"), timeout=30)
        assert r.status_code == 200, r.text
        acked: list[str] = []
        failed: list[tuple[int, str]] = []
        stop = threading.Event()

        def learner() -> None:
            with httpx.Client(base_url=c.data_url(), timeout=60) as http:
                while not stop.is_set():
                    r = http.post("/api/sessions", json={"learner": "ada"})
                    if r.status_code == 201:
                        acked.append(r.json()["session_id"])
                    else:
                        failed.append((r.status_code, r.text[:200]))

        threads = [threading.Thread(target=learner) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for("learners served", lambda: len(acked) > 20)
        old = store.primary()
        if fault == "kill":
            old.proc.kill()  # type: ignore[union-attr]
        else:
            old.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            wait_for("a replica promoted", lambda: store.primary() is not old, timeout=30)
            before = len(acked)
            wait_for("learners served by the new primary", lambda: len(acked) > before + 20, timeout=60)
            if fault != "kill":
                time.sleep(6.0)  # kept frozen 6 s past the promotion: writes go on to the new primary meanwhile
        finally:
            if fault != "kill":
                old.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        if fault != "kill":
            def rejoined() -> bool:
                with old.admin(decode_responses=True) as r:
                    return r.info("replication").get("role") == "slave"
            wait_for("the thawed old primary rejoins as a replica", rejoined, timeout=60)
            before = len(acked)
            wait_for("learners served after the thaw", lambda: len(acked) > before + 20, timeout=60)
        stop.set()
        for t in threads:
            t.join(60)
        assert failed == [], failed[:5]
        keys = Keys(prefix=c.prefix)
        with store.primary().admin() as r:
            pipe = r.pipeline(transaction=False)
            for sid in acked:
                pipe.exists(keys.session(sid))
            missing = [sid for sid, n in zip(acked, pipe.execute(), strict=True) if not n]
        assert missing == [], f"{len(missing)} of {len(acked)} acknowledged sessions lost: {missing[:5]}"
        # both dispatchers name the same leader (a standby may say "none" for a moment after the store
        # came back). The two reads are not simultaneous: a lease that moves between them (a starved
        # leader on a loaded machine) names two leaders of two epochs; two of one epoch is a split brain
        def agreed() -> dict[str, dict] | None:
            states = {d: c.state(d) for d in ("A", "B")}
            claims = {(st["leader"], next((v["epoch"] for v in st["dispatchers"] if v["name"] == st["leader"]),
                                          None)) for st in states.values() if st["leader"]}
            epochs = [e for _, e in claims if e is not None]
            assert len(claims) <= 1 or len(set(epochs)) == len(epochs), f"two leaders of one epoch: {claims}"
            named = {leader for leader, _ in claims}
            return states if len(named) == 1 and all(st["leader"] for st in states.values()) else None
        states = wait_for("both dispatchers name one leader", agreed)
        assert all(next(s for s in st["servers"] if s["name"] == "trainer-2")["state"] == "draining"
                   for st in states.values())
    finally:
        c.stop()

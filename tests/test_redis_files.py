"""What Redis does with a damaged AOF, and the safe way back (README, "Redis's own files")."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ctops_tools.localcluster import wait_for
from ctops_tools.redis_embed import EmbeddedRedis, EmbeddedStore, RedisLaunchError, StoreSecrets, find_redis_server


def aof(node: EmbeddedRedis) -> Path:
    return Path(node.data_dir) / "appendonly.aof"


def written(tmp_path: Path, name: str, n: int = 200, secrets: StoreSecrets | None = None) -> EmbeddedRedis:
    node = EmbeddedRedis(data_dir=str(tmp_path / name), appendonly=True, secrets_=secrets).start()
    with node.admin() as r:
        for i in range(n):
            r.set(f"k{i}", f"value {i}")
    node.stop()
    return node


def test_a_torn_aof_tail_loads_without_the_last_write(tmp_path: Path) -> None:
    node = written(tmp_path, "torn")
    with open(aof(node), "ab") as f:
        f.write(b"*3\r\n$3\r\nSET\r\n$4\r\nlast\r\n$10\r\nhalf")  # power lost mid-append
    node.start()
    try:
        with node.admin() as r:
            assert r.dbsize() == 200 and r.get("k199") == b"value 199" and r.get("last") is None
    finally:
        node.stop()


def test_a_damaged_aof_middle_refuses_to_start_and_a_resync_from_a_replica_brings_all_back(tmp_path: Path) -> None:
    secrets = StoreSecrets.generate()  # one store: the replica logs in to the primary with them
    healthy = EmbeddedRedis(data_dir=str(tmp_path / "healthy"), appendonly=True, secrets_=secrets).start()
    damaged = written(tmp_path, "damaged", secrets=secrets)
    try:
        with healthy.admin() as r:
            for i in range(200):
                r.set(f"k{i}", f"value {i}")
        data = bytearray(aof(damaged).read_bytes())
        middle = data.index(b"*3\r\n", len(data) // 2)
        data[middle:middle + 1] = b"?"  # a command's header, not just a value's bytes
        aof(damaged).write_bytes(bytes(data))
        # run directly, not through the launcher: its PING could reach another process that took the
        # port meanwhile
        conf = Path(damaged.data_dir) / "redis.conf"
        ran = subprocess.run([find_redis_server(), str(conf)], capture_output=True, timeout=30)
        log = (Path(damaged.data_dir) / "redis.log").read_text(errors="replace")
        assert ran.returncode != 0 and "Bad file format reading the append only file" in log
        # the safe way: the damaged file set aside (not cut by redis-check-aof --fix), the node
        # loads a full copy from the healthy one
        aof(damaged).rename(aof(damaged).with_suffix(".damaged"))
        conf.write_text(conf.read_text() + f"replicaof {healthy.host} {healthy.port}\n")
        damaged.start()
        with damaged.admin() as r:
            wait_for("the full resync", lambda: r.dbsize() == 200 and r.get("k100") == b"value 100", 30)
    finally:
        damaged.stop()
        healthy.stop()


# --- the demo's store does the safe thing on its own -------------------------------------------

def _damage_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = data.index(b"*3\r\n", len(data) // 2)
    data[middle:middle + 1] = b"?"  # a command's header: Redis refuses the file, not just one value
    path.write_bytes(bytes(data))


def _stopped_store_with_data(workdir: Path, n: int, messages: list[str]) -> EmbeddedStore:
    store = EmbeddedStore(workdir, prefix="t", report=messages.append).start()
    with store.primary().admin() as r:
        for i in range(n):
            r.set(f"t:k{i}", f"value {i}")
        r.wait(2, 5000)  # both replicas have every write before the store stops
    store.stop()
    return store


def _restart(workdir: Path, messages: list[str]) -> EmbeddedStore:
    # the path `ctops demo` takes: EmbeddedStore on the same workdir, then start()
    again = EmbeddedStore(workdir, prefix="t", report=messages.append)
    assert again.restarted, "the store must come back on its own ports and passwords for this test"
    return again.start()


def _role(node: EmbeddedRedis) -> str:
    with node.admin(decode_responses=True) as r:
        return str(r.info("replication")["role"])


def _all_there(node: EmbeddedRedis, n: int) -> bool:
    with node.admin() as r:
        return r.dbsize() == n and r.get("t:k0") == b"value 0" and r.get(f"t:k{n - 1}") == f"value {n - 1}".encode()


def test_the_demo_store_resyncs_a_replica_whose_aof_is_damaged_in_the_middle(tmp_path: Path) -> None:
    messages: list[str] = []
    first = _stopped_store_with_data(tmp_path / "redis", 300, messages)
    replica = Path(first.node("redis-2").data_dir)
    _damage_middle(replica / "appendonly.aof")
    damaged_bytes = (replica / "appendonly.aof").read_bytes()
    store = _restart(tmp_path / "redis", messages)
    try:
        node = store.node("redis-2")
        assert _role(node) == "slave" and store.primary().name == "redis-1"
        wait_for("the resynced replica to hold every key", lambda: _all_there(node, 300), 30)
        [aside] = list(replica.glob("damaged-aof-*/appendonly.aof"))
        assert aside.read_bytes() == damaged_bytes  # kept as it was, not cut
        assert any("redis-2" in m and "damaged" in m and str(aside.parent) in m for m in messages)
        # the role is in its config: a later restart keeps it a replica
        assert not node.configured_primary()
    finally:
        store.stop()


def test_the_demo_store_resyncs_a_primary_whose_aof_is_damaged_and_hands_its_role_back(tmp_path: Path) -> None:
    messages: list[str] = []
    first = _stopped_store_with_data(tmp_path / "redis", 300, messages)
    primary = Path(first.node("redis-1").data_dir)
    _damage_middle(primary / "appendonly.aof")
    store = _restart(tmp_path / "redis", messages)
    try:
        node = store.node("redis-1")
        log = (primary / "redis.log").read_text(errors="replace")
        assert "MASTER <-> REPLICA sync: Finished with success" in log  # a full copy, from a replica
        assert _all_there(node, 300) and _role(node) == "master"
        # the Sentinels' view holds: redis-1 is the primary they name, with both replicas in sync
        assert store.primary().name == "redis-1"
        for other in ("redis-2", "redis-3"):
            assert _role(store.node(other)) == "slave"
            wait_for(f"{other} to hold every key", lambda o=other: _all_there(store.node(o), 300), 30)
        assert list(primary.glob("damaged-aof-*/appendonly.aof"))
        assert any("redis-1" in m and "primary again" in m for m in messages)
        with node.admin() as r:  # and it takes writes again
            r.set("t:after", "1")
            assert r.wait(1, 5000) >= 1
    finally:
        store.stop()


def test_a_store_whose_every_aof_is_damaged_refuses_to_start_and_names_the_way_back(tmp_path: Path) -> None:
    messages: list[str] = []
    first = _stopped_store_with_data(tmp_path / "redis", 300, messages)
    for n in first.nodes:
        _damage_middle(Path(n.data_dir) / "appendonly.aof")
    with pytest.raises(RedisLaunchError, match="restore from a backup"):
        _restart(tmp_path / "redis", messages)
    for n in first.nodes:  # nothing was moved or cut
        assert (Path(n.data_dir) / "appendonly.aof").exists()

"""What Redis does with a damaged AOF, and the safe way back (README, "Redis's own files")."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ctops_tools.localcluster import wait_for
from ctops_tools.redis_embed import EmbeddedRedis, StoreSecrets, find_redis_server


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

"""`ctops_tools.backup` on a real primary with a replica: the snapshot comes from the replica, restores
exactly, and a file of another prefix is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctops_tools.backup import BackupError, backup, restore
from ctops_tools.localcluster import wait_for
from ctops_tools.redis_embed import EmbeddedRedis, EmbeddedStore


def test_backup_from_the_replica_restores_every_key_with_its_ttl(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "store", replicas=1, sentinels=1, min_replicas=0).start()
    fresh = EmbeddedRedis(data_dir=str(tmp_path / "fresh")).start()
    try:
        primary, replica = store.nodes
        with primary.admin() as r:
            for i in range(300):
                r.set(f"bk:submission:{i}", f"v{i}".encode() + b"\xff\x00")
            r.hset("bk:session:a", mapping={"learner": "ada"})
            r.set("bk:idempotency:x", "y", ex=3600)
            r.set("other:key", "not ours")
        with replica.admin() as rr:
            wait_for("the replica to catch up", lambda: rr.exists("bk:idempotency:x") == 1, 30)
        with primary.admin() as r:
            res = backup(r, "bk", tmp_path / "b.ctb")
        assert res.records == 302 and "(replica)" in res.source and str(replica.port) in res.source
        with fresh.admin() as f:
            assert restore(f, tmp_path / "b.ctb", "bk") == 302
            assert f.get("bk:submission:7") == b"v7\xff\x00" and f.hgetall("bk:session:a") == {b"learner": b"ada"}
            assert 3500 < f.ttl("bk:idempotency:x") <= 3600 and f.exists("other:key") == 0
            with pytest.raises(BackupError, match="holds prefix 'bk', the target store uses 'ctops'"):
                restore(f, tmp_path / "b.ctb", "ctops")
    finally:
        fresh.stop()
        store.stop()

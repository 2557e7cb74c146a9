from __future__ import annotations

import redis

from ctops_tools.procs import pid_alive
from ctops_tools.redis_embed import EmbeddedRedis, find_redis_server


def test_embedded_redis_starts_answers_and_stops(tmp_path) -> None:
    assert find_redis_server()
    r = EmbeddedRedis(data_dir=str(tmp_path / "data")).start()
    pid = r.pid
    assert pid and pid_alive(pid)
    client = redis.Redis.from_url(r.url)
    assert client.ping()
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()
    r.stop()
    assert not pid_alive(pid)


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    from ctops_tools.redis_embed import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)

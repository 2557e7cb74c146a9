"""Outcomes under the keys the dispatcher makes for keyless writes are kept only as long as its own
retries may send them again; a client's own key keeps its outcome for `[trainer] idempotency_ttl_s`.
A real dispatcher in front of a real trainer, with a short retry window configured."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import httpx
import redis

from ctops.config import Timings
from ctops.keys import Keys
from tests.cluster import Cluster, wait_for
from trainer.idempotency import generated_key_ttl_s

# tries within 200 ms, each connecting within 100 ms and answered within 700 ms: 1 s in all
WINDOW = {"retry_total_ms": 200, "upstream_connect_timeout_ms": 100, "upstream_read_timeout_ms": 700}


def test_the_window_is_derived_from_the_dispatchers_retry_timings() -> None:
    assert generated_key_ttl_s(Timings(**WINDOW)) == 1
    assert generated_key_ttl_s(Timings()) == 66  # 5 s of tries, 1 s to connect, 60 s to answer


def test_outcomes_of_keyless_writes_expire_with_the_retry_window(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(trainers=1, timings=WINDOW)
    c.start_all()
    pattern = Keys(prefix=c.prefix).idempotency("*")
    with redis.Redis.from_url(c.redis.url) as r:
        before = set(r.scan_iter(pattern))
        # a learner's write without a key, through the dispatcher: it gets one of the dispatcher's
        created = httpx.post(c.data_url() + "/api/sessions", json={"learner": "keyless"}, timeout=30)
        assert created.status_code == 201, created.text
        generated = set(r.scan_iter(pattern)) - before
        assert len(generated) == 1, generated
        (gkey,) = generated
        assert 0 < r.pttl(gkey) <= 1000
        # a client's own key: kept for the documented day
        own = httpx.post(c.data_url() + "/api/sessions", json={"learner": "keyed"}, timeout=30,
                         headers={"Idempotency-Key": "learner-own-key-1"})
        assert own.status_code == 201, own.text
        okey = Keys(prefix=c.prefix).idempotency(hashlib.sha256(b"learner-own-key-1").hexdigest())
        assert r.ttl(okey) > 86_000
        wait_for("the generated key's outcome to expire", lambda: not r.exists(gkey), timeout=60)
        assert r.exists(okey)
        # the session the keyless write made is still there: only the outcome record went
        sid = created.json()["session_id"]
        assert httpx.get(f"{c.data_url()}/api/sessions/{sid}", timeout=30).status_code == 200

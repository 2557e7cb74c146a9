"""Outcomes under the keys the dispatcher makes for keyless writes are kept only as long as its own
retries may send them again; a client's own key keeps its outcome for `[trainer] idempotency_ttl_s`.
A real dispatcher in front of a real trainer, with a short retry window configured."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from ctops.config import Timings
from ctops.keys import Keys
from tests.cluster import Cluster, wait_for
from trainer.idempotency import generated_key_ttl_s

# tries within 200 ms, each connecting within 100 ms and answered within 700 ms: 1 s in all
# a frozen server must be found out within the dispatcher's retries: the short health timings
pytestmark = pytest.mark.quick_timings

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


def _sessions_of(r: redis.Redis, prefix: str, learner: str) -> int:
    return sum(1 for k in r.scan_iter(f"{prefix}:session:*")
               if r.type(k) == b"hash" and r.hget(k, "learner") == learner.encode())


def test_a_try_left_in_a_frozen_server_past_the_window_is_not_run_again(make_cluster) -> None:
    """A keyless write sent to a server that then froze is answered by another; the frozen one, thawed
    after the outcome's short life is over, finds the try it never read: it must not run it again."""
    # tries for up to 3 s, so a hung server's request moves on (first-byte deadline + probe) in time
    c = make_cluster(trainers=2, timings={**WINDOW, "retry_total_ms": 3000})
    c.start_all()
    window = generated_key_ttl_s(Timings(**{**WINDOW, "retry_total_ms": 3000}))
    with httpx.Client(base_url=c.data_url(), timeout=30) as learner, redis.Redis.from_url(c.redis.url) as r:
        first = learner.post("/api/sessions", json={"learner": "warm-up"})
        home = learner.cookies["ctops_srv"].rsplit(".", 1)[0]
        c.signal(home, signal.SIGSTOP)
        try:
            moved = learner.post("/api/sessions", json={"learner": "frozen-once"})
            assert moved.status_code == 201 and moved.json()["server"] != home, moved.text
            assert first.status_code == 201
            time.sleep(window + 1)  # the outcome of the generated key is gone (the window, not a timing assert)
        finally:
            c.signal(home, signal.SIGCONT)
        c.wait_state(home, "up")
        # the thawed server has read what waited in its socket by the time it passes health checks again
        wait_for("the thawed server answering", lambda: httpx.get(c.trainer_url(home) + "/healthz").is_success)
        assert _sessions_of(r, c.prefix, "frozen-once") == 1

"""SMOKE TEST of `ctops bench store-failover`: the bench's own code path for setup (a) with a very
short load, so the bench keeps working. No timing asserts (the figures belong to the bench run);
it checks that the reported fields are there and make sense."""

from __future__ import annotations

from pathlib import Path

from ctops_tools.bench.store_failover import scenario


def test_smoke_bench_store_failover_tuned_setup_reports_sane_fields(tmp_path: Path) -> None:
    r = scenario("tuned", tmp_path / "tuned", learners=2, warm_s=1.5, window_s=6.0)
    assert r["setup"] == "tuned" and r["requests"] > 0
    assert isinstance(r["failed"], int) and 0 <= r["failed"] <= r["requests"]
    assert r["acknowledged"]["sessions"] >= 1 and r["acknowledged"]["submissions"] >= 1
    # WAIT keeps every acknowledged write through the failover; the read-back found them all
    assert r["acknowledged_lost"] == 0, r["lost"]
    # writes came back within the window (a number, not "never"); how fast is the bench's to say
    assert r["writes_back_s"] is not None and r["writes_back_s"] >= 0
    assert r["p99_fault_ms"] is not None


def test_store_with_sentinel_defaults_is_what_sentinels_run(tmp_path: Path) -> None:
    # setup (b) of the bench compares against these; the tuned store stays the default
    from ctops_tools.redis_embed import EmbeddedStore

    with EmbeddedStore(tmp_path / "store", down_after_ms=30_000, failover_timeout_ms=180_000) as store:
        for s in store.sentinels:
            with s.client() as c:
                m = c.execute_command("SENTINEL", "MASTER", store.service)
            state = dict(zip(m[::2], m[1::2], strict=False)) if isinstance(m, list) else m
            assert (int(state["down-after-milliseconds"]), int(state["failover-timeout"])) == (30_000, 180_000)
    assert EmbeddedStore(tmp_path / "tuned").sentinels[0].down_after_ms == 1000

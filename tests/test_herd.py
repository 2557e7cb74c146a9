"""A herd of agents when the leader dies: no host is reported lost and every agent reaches the new
leader; and the agents' retry schedule (move jitter, bounded backoff) keeps within its bounds."""

from __future__ import annotations

import random
import signal
import statistics
import time

import pytest

from agents.heartbeat import MOVE_JITTER, Backoff
from ctops_tools.bench.heartbeats import Fleet, alive_hosts, events_after, last_event_id, leader, sim_hosts, sim_toml
from tests.cluster import Cluster, wait_for

HOSTS = 200


def test_moves_are_jittered_within_a_quarter_interval() -> None:
    b = Backoff(interval=1.0, lost_after=3.0, rng=random.Random(7))
    delays = [b.move_delay() for _ in range(2000)]
    assert all(0.0 <= d <= MOVE_JITTER for d in delays)
    # spread over the whole window, not bunched: agents that saw the same failure move at different times
    assert min(delays) < 0.05 * MOVE_JITTER and max(delays) > 0.95 * MOVE_JITTER
    assert statistics.pstdev(delays) > 0.2 * MOVE_JITTER


def test_failed_rounds_back_off_exponentially_up_to_half_the_lost_timeout() -> None:
    b = Backoff(interval=1.0, lost_after=10.0, rng=random.Random(1))
    waits = [b.next_wait(False) for _ in range(12)]
    bases = [min(5.0, 2.0 ** k) for k in range(12)]  # 1, 2, 4, then the cap of 5 s
    for w, base in zip(waits, bases, strict=True):
        assert base * (1 - MOVE_JITTER) <= w <= base
    assert max(waits) <= 5.0 and waits[3] > waits[0] * 2.5
    # one delivered heartbeat and the agent is back to its interval
    assert b.next_wait(True) == 1.0 and b.failures == 0
    assert b.next_wait(False) <= 1.0


def test_backoff_never_waits_past_what_would_make_the_host_lost() -> None:
    for lost_after in (0.5, 3.0, 30.0):
        b = Backoff(interval=1.0, lost_after=lost_after, rng=random.Random(3))
        waits = [b.next_wait(False) for _ in range(100)]
        # the cap is half the timeout, or the interval itself when the timeout is shorter than two beats
        assert max(waits) <= max(1.0, lost_after / 2)


@pytest.mark.timeout(900)  # a few hundred agents on a loaded 2-core machine
def test_leader_kill_under_a_herd_loses_no_host(make_cluster) -> None:
    hosts = sim_hosts(HOSTS)
    names = set(hosts)
    c: Cluster = make_cluster(trainers=1, dispatchers=("A", "B"), extra_toml=sim_toml(hosts),
                              timings={"heartbeat_interval_ms": 1000, "heartbeat_timeout_ms": 3000})
    c.start_all()
    urls = [c.ops_url("A"), c.ops_url("B")]
    fleet = Fleet(hosts, urls, interval=1.0, procs=2).start()
    records = []
    try:
        old = wait_for("a leader", lambda: leader(c, "A") or leader(c, "B"))
        new = "B" if old == "A" else "A"
        wait_for("every simulated host alive", lambda: alive_hosts(c, old, names) == HOSTS, timeout=120, every=1)
        cursor = last_event_id(c, new)
        killed_at = time.monotonic()  # the simulated agents' records share this clock (CLOCK_MONOTONIC)
        c.signal(old, signal.SIGKILL)
        wait_for(f"{new} to lead", lambda: leader(c, new) == new, timeout=60)
        # a few intervals on the new leader, looking for a host it calls lost
        for _ in range(6):
            wait_for("every host alive on the new leader", lambda: alive_hosts(c, new, names) == HOSTS, timeout=60)
            time.sleep(1.0)
        lost = [e for e in events_after(c, new, cursor) if e["kind"] == "host_lost"]
    finally:
        records = fleet.stop()
    assert lost == []
    new_idx = urls.index(c.ops_url(new))
    reached = {idx for end, idx, d, _, status in records if d == new_idx and status == 200 and end > killed_at}
    assert len(reached) == HOSTS
    # and after the kill each agent's last heartbeat went to the new leader, none were left on the dead one
    last = {}
    for _end, idx, d, _, status in sorted(records):
        if status == 200:
            last[idx] = d
    assert set(last.values()) == {new_idx}

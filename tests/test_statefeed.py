"""The state change feed gives a client the same document as the full state, after any sequence of
changes: hosts and servers changing, appearing, going away, the leader moving (a property test)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ctops.statefeed import FeedLog, apply_changes
from ctops.wire import ClusterState, HostMetrics, HostView, ServerView

NAMES = [f"h{i}" for i in range(6)]


def host(name: str, state: str, seq: int | None, cpu: float | None) -> HostView:
    metrics = None if cpu is None else HostMetrics(cpu_percent=cpu, memory_percent=1, memory_used_bytes=1,
                                                   disk_percent=1, load1=0, load5=0, load15=0)
    return HostView(name=name, state=state, heartbeat_age_ms=None if seq is None else seq * 10, seq=seq,
                    metrics=metrics)


def server(name: str, health: str) -> ServerView:
    return ServerView(name=f"s-{name}", url="http://127.0.0.1:1", host=name, state="up" if health == "up" else "down",
                      admin="enabled", health=health)


host_st = st.builds(host, st.sampled_from(NAMES), st.sampled_from(["alive", "late", "lost"]),
                    st.none() | st.integers(0, 3), st.none() | st.sampled_from([0.0, 1.5, 99.0]))
state_st = st.builds(
    lambda hosts, healths, leader, now: ClusterState(
        cluster="c", leader=leader, served_by="A", now_ms=now, dispatchers=[],
        servers=[server(h.name, healths[i % len(healths)]) for i, h in enumerate(hosts)],
        hosts=hosts, rejected={"heartbeat": now % 3}),
    st.lists(host_st, max_size=6, unique_by=lambda h: h.name),
    st.lists(st.sampled_from(["up", "down", "suspect"]), min_size=1, max_size=3),
    st.sampled_from([None, "A", "B"]), st.integers(0, 5))


@settings(max_examples=300, deadline=None)
@given(st.lists(state_st, min_size=1, max_size=8), st.lists(st.integers(0, 7), min_size=1, max_size=4))
def test_changes_applied_to_an_older_document_give_the_full_document(states: list[ClusterState],
                                                                      picks: list[int]) -> None:
    feed = FeedLog()
    held: list[tuple[str, dict]] = []  # (version, document) a client held at each step
    for s in states:
        feed.record(s)
        full = feed.since(None)
        held.append((full.version, apply_changes(None, full)))
        assert held[-1][1] == s.model_dump(mode="json")
    current = states[-1].model_dump(mode="json")
    for p in picks:
        version, doc = held[p % len(held)]
        changes = feed.since(version)
        assert changes.full is None  # a version this feed gave is never too old
        assert apply_changes(doc, changes) == current


def test_an_unknown_version_gets_the_full_document() -> None:
    feed = FeedLog()
    s = ClusterState(cluster="c", leader="A", served_by="A", now_ms=1, dispatchers=[], servers=[],
                     hosts=[host("h1", "alive", 1, 1.0)])
    feed.record(s)
    other = FeedLog()  # another dispatcher process: its versions mean nothing here
    other.record(s)
    for version in (None, "", other.version, f"{feed.epoch}:999", "garbage"):
        assert feed.since(version).full == s


def test_unchanged_hosts_are_not_sent_again() -> None:
    feed = FeedLog()
    hosts = [host(n, "alive", 1, 1.0) for n in NAMES]
    feed.record(ClusterState(cluster="c", leader="A", served_by="A", now_ms=1, dispatchers=[], servers=[],
                             hosts=hosts))
    v = feed.version
    hosts[2] = host("h2", "alive", 2, 5.0)
    feed.record(ClusterState(cluster="c", leader="A", served_by="A", now_ms=2, dispatchers=[], servers=[],
                             hosts=hosts))
    ch = feed.since(v)
    # only h2's changed fields and the clock: not the other five hosts, not h2's name-only fields
    assert ch.fields == {"now_ms": 2}
    assert ch.changed == {"hosts": [{"name": "h2", "seq": 2, "heartbeat_age_ms": 20,
                                     "metrics": hosts[2].metrics.model_dump(mode="json")}]}
    assert not ch.removed and not ch.order
    # nothing new: nothing sent, and the version stays
    feed.record(ClusterState(cluster="c", leader="A", served_by="A", now_ms=2, dispatchers=[], servers=[],
                             hosts=hosts))
    same = feed.since(feed.version)
    assert same.version == ch.version and not (same.fields or same.changed or same.removed or same.order)

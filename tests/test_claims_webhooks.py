"""README claim: each webhook's cursor lives in Redis and moves only after a 2xx, so a new leader
resumes delivery where the old one stopped: nothing is lost, nothing already delivered is sent
again, and the order holds. Real dispatchers, a real receiver, the old leader SIGKILLed."""

from __future__ import annotations

import signal
from collections.abc import Callable

from tests.cluster import Cluster, wait_for
from tests.test_notifications import Receiver, ev, post_events


def test_a_new_leader_resumes_webhook_delivery_from_the_cursor(make_cluster: Callable[..., Cluster]) -> None:
    rx = Receiver()
    rx.up()
    c = make_cluster(dispatchers=("A", "B"), trainers=1)
    with open(c.config, "a") as f:
        f.write(f'[[webhooks]]\nname = "ops"\nurl = "http://127.0.0.1:{rx.port}/hook"\ngroup_window_ms = 0\n')
    c.start_all()
    old = wait_for("one leader seen by both", lambda: (ls := {c.state(d)["leader"] for d in c.dispatchers})
                   and len(ls) == 1 and None not in ls and ls.pop(), 60)
    new = "B" if old == "A" else "A"
    first = [ev(f"first-{i}", f"p{i}", i) for i in range(3)]
    later = [ev(f"later-{i}", f"q{i}", i) for i in range(4)]
    ours = {e["kind"] for e in first + later}

    def got() -> list[str]:
        return [e["kind"] for e in rx.events() if e["kind"] in ours]

    post_events(c, first, 1)
    wait_for("the first events delivered by the old leader", lambda: len(got()) == 3, 60)
    rx.down()
    post_events(c, later, 2)
    c.signal(old, signal.SIGKILL)  # it may be retrying the later events meanwhile; none got a 2xx
    wait_for(f"{new} leads", lambda: c.state(new)["leader"] == new, 60)
    rx.up()
    wait_for("the later events delivered by the new leader", lambda: len(got()) >= 7, 60)
    assert got() == [e["kind"] for e in first + later]  # each once, in order, none of the first again
    ids = [i for e in rx.events() for i in e["ids"]]
    assert len(ids) == len(set(ids))
    rx.down()

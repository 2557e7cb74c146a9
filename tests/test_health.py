"""Health: a SIGKILLed trainer is marked down and new requests go to the others; a SIGSTOPped one
is marked down by the checks; after SIGCONT it is up again after the rise count."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.cluster import Cluster, wait_for

# it freezes and kills trainers and waits for the checks to notice
pytestmark = pytest.mark.quick_timings


def served_by(c: Cluster, n: int = 12) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=c.data_url(), timeout=10) as client:
        for _ in range(n):
            client.cookies.clear()  # no session to stick to: each request is balanced
            r = client.post("/api/sessions", json={})  # a learner's route (/healthz is not one)
            assert r.status_code == 201, r.text
            seen[r.json()["server"]] += 1
    return seen


def test_sigkill_marks_down_and_traffic_moves(make_cluster) -> None:
    c: Cluster = make_cluster()
    c.start_all()
    assert set(served_by(c)) == {"trainer-1", "trainer-2", "trainer-3"}
    c.signal("trainer-2", signal.SIGKILL)
    s = c.wait_state("trainer-2", "down")
    assert s["last_error"]
    # every request after the kill is served, by the two others only
    assert set(served_by(c, 20)) == {"trainer-1", "trainer-3"}


def test_sigstop_marked_down_then_sigcont_up_after_rise(make_cluster) -> None:
    c: Cluster = make_cluster()
    c.start_all()
    c.signal("trainer-1", signal.SIGSTOP)
    try:
        s = c.wait_state("trainer-1", "down")
        assert "timed out" in (s["last_error"] or "")
        assert "trainer-1" not in served_by(c, 12)
    finally:
        c.signal("trainer-1", signal.SIGCONT)
    # the rise count means several passing checks; the state is up only after them
    c.wait_state("trainer-1", "up")
    wait_for("trainer-1 serving again", lambda: "trainer-1" in served_by(c, 9))


def test_states_are_published_to_redis_for_other_dispatchers(make_cluster) -> None:
    c: Cluster = make_cluster(dispatchers=("A", "B"))
    c.start_all()
    c.signal("trainer-3", signal.SIGKILL)
    c.wait_state("trainer-3", "down", "A")
    c.wait_state("trainer-3", "down", "B")
    st = c.state("B")
    assert st["leader"] in ("A", "B")
    assert {d["name"]: d["healthy"] for d in st["dispatchers"]} == {"A": True, "B": True}


def test_down_server_comes_back_after_exactly_rise_passing_checks(make_cluster) -> None:
    """trainer-1 is a scripted server that, for each passing readiness check, asks the dispatcher how
    it sees the server before answering: the first `rise` passing checks find it still down, the
    next one finds it up. Checks are allowed to take long (the server asks the ops API meanwhile)."""
    rise = 3
    c: Cluster = make_cluster(trainers=1, timings={"rise": rise, "health_timeout_ms": 5000})
    mode = {"now": "ok"}
    seen: list[str] = []

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            status = 200
            if mode["now"] == "fail":
                status = 503
            elif mode["now"] == "rising":
                seen.append(c.server("trainer-1")["health"])
            body = b"{}"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", c.ports["trainer-1"]), Ready)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c.start("A")
        c.wait_state("trainer-1", "up")
        mode["now"] = "fail"
        assert "HTTP 503" in (c.wait_state("trainer-1", "down")["last_error"] or "")
        mode["now"] = "rising"
        wait_for(f"{rise + 1} passing checks", lambda: len(seen) >= rise + 1)
        assert seen[:rise + 1] == ["down"] * rise + ["up"], seen
    finally:
        srv.shutdown()
        srv.server_close()

"""Staff commands reach the agent on its host; events land in the stream once; webhooks get every
event once, even when the receiver was down for a while, with bursts grouped."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from ctops_tools.redis_embed import free_port
from tests.cluster import Cluster, events, process, wait_for


def test_restart_from_staff_runs_on_the_host_and_is_audited(make_cluster) -> None:
    c: Cluster = make_cluster(trainers=2, hosts_with_agents=True)
    c.start_all()
    old = wait_for("trainer-1 pid", lambda: process(c, "host-1").get("pid"))
    url = c.ops_url() + "/api/v1/hosts/host-1/processes/trainer-1/restart"
    assert httpx.post(url, headers=c.auth("viewer")).status_code == 403
    r = httpx.post(url, headers=c.auth("operator"), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["ok"] and "restarted" in r.json()["message"] and r.json()["by"] == "test-operator"
    wait_for("new pid in heartbeat", lambda: process(c, "host-1").get("pid") not in (None, old))
    c.wait_state("trainer-1", "up")
    bad = httpx.post(c.ops_url() + "/api/v1/hosts/host-1/processes/nope/restart", headers=c.auth("operator"))
    assert bad.status_code == 404
    audit = httpx.get(c.ops_url() + "/api/v1/audit", headers=c.auth("viewer")).json()
    assert [(a["action"], a["target"]) for a in audit[:2]] == [
        ("restart", "host-1/nope"), ("restart", "host-1/trainer-1")]
    assert audit[1]["result"].startswith("ok:") and audit[1]["who"] == "test-operator"
    kinds = [(e["kind"], e["target"]) for e in events(c)]
    assert ("process_restarted", "trainer-1") in kinds


def test_killed_process_gives_one_restart_event(make_cluster) -> None:
    c: Cluster = make_cluster(trainers=1, hosts_with_agents=True)
    c.start_all()
    pid = wait_for("pid", lambda: process(c, "host-1").get("pid"))
    import os
    os.kill(pid, signal.SIGKILL)
    wait_for("restart event", lambda: [e for e in events(c) if e["kind"] == "process_restarted"])
    wait_for("restarts in heartbeat", lambda: process(c, "host-1").get("restarts") == 1)
    restarts = [e for e in events(c) if e["kind"] == "process_restarted"]
    assert len(restarts) == 1 and "SIGKILL" in restarts[0]["message"] and restarts[0]["source"] == "agent:host-1"


class Receiver:
    """A webhook receiver that can be taken down and brought back on the same port, and told to
    answer the first post holding an event of a given kind with 500 (it read it, but the sender must
    not count it delivered)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[dict] = []  # those answered 2xx, in the order they came
        self.attempts: list[tuple[int, dict]] = []  # every post read, with the status it got
        self.fail_once_on: str | None = None
        self.server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 204
                if rx.fail_once_on and any(e["kind"] == rx.fail_once_on for e in body["events"]):
                    rx.fail_once_on = None
                    status = 500
                else:
                    rx.messages.append(body)
                rx.attempts.append((status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def events(self) -> list[dict]:
        return [e for m in self.messages for e in m["events"]]


def post_events(c: Cluster, evs: list[dict], seq: int) -> None:
    hb = {"host": "host-1", "seq": seq, "sent_at_ms": 1, "processes": [], "events": evs,
          "metrics": {"cpu_percent": 1, "memory_percent": 1, "memory_used_bytes": 1, "disk_percent": 1,
                      "load1": 0, "load5": 0, "load15": 0}}
    r = httpx.post(c.ops_url() + "/api/v1/heartbeat", json=hb, headers=c.auth("agent"))
    assert r.status_code == 200, r.text


def ev(kind: str, target: str, n: int, severity: str = "warning") -> dict:
    return {"id": uuid.uuid4().hex, "kind": kind, "process": target, "severity": severity,
            "message": f"{kind} {target} #{n}", "ts_ms": 1}


def test_webhook_receiver_down_then_back_gets_every_event_once(make_cluster, tmp_path) -> None:
    rx = Receiver()
    c: Cluster = make_cluster(trainers=1)
    with open(c.config, "a") as f:
        f.write(f'[[webhooks]]\nname = "ops-chat"\nurl = "http://127.0.0.1:{rx.port}/hook"\ngroup_window_ms = 300\n')
    c.start_all()
    rx.up()
    sent = [ev(f"kind{i}", f"p{i}", i) for i in range(3)]
    post_events(c, sent, 1)
    wait_for("first events delivered", lambda: len(rx.events()) >= 3)
    rx.down()
    later = [ev(f"late{i}", f"q{i}", i) for i in range(4)]
    post_events(c, later[:2], 2)
    post_events(c, later[:2], 3)  # a repeated heartbeat: the same events must not be stored twice
    post_events(c, later[2:], 4)
    rx.up()
    ours = {e["kind"] for e in sent + later}

    def mine() -> list[dict]:
        return [e for e in rx.events() if e["kind"] in ours]

    wait_for("every event delivered", lambda: sum(e["count"] for e in mine()) >= 7, timeout=60)
    # each once, in the order they happened (the repeated heartbeat stored nothing twice)
    assert [e["kind"] for e in mine()] == [e["kind"] for e in sent + later]
    assert all(e["count"] == 1 for e in mine())
    ids = [i for e in rx.events() for i in e["ids"]]
    assert len(ids) == len(set(ids))
    rx.down()


def test_webhook_groups_a_burst(make_cluster) -> None:
    rx = Receiver()
    rx.up()
    c: Cluster = make_cluster(trainers=1)
    with open(c.config, "a") as f:
        f.write(f'[[webhooks]]\nname = "burst"\nurl = "http://127.0.0.1:{rx.port}/hook"\ngroup_window_ms = 500\n')
    c.start_all()
    post_events(c, [ev("process_restarted", "trainer-9", i) for i in range(10)], 1)
    got = wait_for("grouped message", lambda: [e for e in rx.events() if e["target"] == "trainer-9"])
    assert len(got) == 1 and got[0]["count"] == 10 and len(got[0]["ids"]) == 10
    rx.down()


def test_webhook_min_severity_and_delivery_id(make_cluster) -> None:
    """`min_severity` leaves out what is below it, in order; a message the receiver answered 500 is
    sent again with the same `delivery_id` (so the receiver can drop the repeat), and different
    messages have different ids."""
    every, picky = Receiver(), Receiver()
    every.up()
    picky.up()
    c: Cluster = make_cluster(trainers=1)
    with open(c.config, "a") as f:
        f.write(f'[[webhooks]]\nname = "every"\nurl = "http://127.0.0.1:{every.port}/hook"\ngroup_window_ms = 0\n'
                f'[[webhooks]]\nname = "picky"\nurl = "http://127.0.0.1:{picky.port}/hook"\n'
                'min_severity = "warning"\ngroup_window_ms = 0\n')
    c.start_all()
    every.fail_once_on = "sev-a"
    sent = [ev("sev-a", "p1", 1, "info"), ev("sev-b", "p2", 2, "warning"), ev("sev-c", "p3", 3, "critical"),
            ev("sev-d", "p4", 4, "info"), ev("sev-e", "p5", 5, "critical")]
    post_events(c, sent, 1)
    ours = {e["kind"] for e in sent}

    def got(rx: Receiver) -> list[str]:
        return [e["kind"] for e in rx.events() if e["kind"] in ours]

    wait_for("every event at 'every'", lambda: len(got(every)) == 5, timeout=60)
    wait_for("warnings and up at 'picky'", lambda: len(got(picky)) >= 3, timeout=60)
    assert got(every) == ["sev-a", "sev-b", "sev-c", "sev-d", "sev-e"]
    assert got(picky) == ["sev-b", "sev-c", "sev-e"]
    assert all(e["severity"] in ("warning", "critical") for e in picky.events())
    # the refused post and its retry carry the same delivery_id; delivered messages differ
    status, first = next((s, m) for s, m in every.attempts if any(e["kind"] in ours for e in m["events"]))
    assert status == 500
    retry = next(m for m in every.messages if any(e["kind"] in ours for e in m["events"]))
    assert retry["delivery_id"] == first["delivery_id"] and retry["events"] == first["events"]
    assert retry["webhook"] == "every" and retry["cluster"] == "test"
    for rx in (every, picky):
        ids = [m["delivery_id"] for m in rx.messages]
        assert all(ids) and len(ids) == len(set(ids))
    every.down()
    picky.down()

"""The exceptions ops API against a real dispatcher: ingest, dedupe, grouping, regression, triage,
bad bodies, Sentry envelopes from the real `sentry-sdk`, and `ctops exceptions`."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ctops_tools.cli import main as ctops_main
from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, wait_for


@pytest.fixture(scope="module")
def one_dispatcher(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    """One dispatcher, nothing behind it: the exceptions API needs no trainer."""
    root = tmp_path_factory.mktemp("exc-api")
    c = Cluster(root, redis_server, f"t{os.getpid()}:{root.name}", trainers=1)
    try:
        c.start("A")
        yield c
    finally:
        c.stop()


@pytest.fixture
def disp(one_dispatcher: Cluster) -> Cluster:
    """The module's dispatcher with no exception, event or audit entry stored: each test starts empty."""
    c = one_dispatcher
    with redis.Redis.from_url(c.redis.url) as r:
        for pattern in (f"{c.prefix}:exc:*", f"{c.prefix}:events", f"{c.prefix}:events:*", f"{c.prefix}:audit"):
            for key in r.scan_iter(match=pattern, count=1000):
                r.delete(key)
    wait_for("ops API", lambda: httpx.get(f"{c.ops_url()}/api/v1/whoami", headers=c.auth("viewer"),
                                          timeout=2).status_code == 200)
    return c


def frame(module: str, function: str, lineno: int, in_app: bool = True, path: str = "/srv/app") -> dict[str, Any]:
    return {"filename": f"{path}/{module.replace('.', '/')}.py", "module": module, "function": function,
            "lineno": lineno, "in_app": in_app, "context_line": f"do_{function}()"}


def event(host: str = "host-1", *, func: str = "load", lineno: int = 10, etype: str = "KeyError",
          message: str = "'user-17'", service: str = "trainer", ts_ms: int | None = None,
          event_id: str | None = None) -> dict[str, Any]:
    return {"event_id": event_id or uuid.uuid4().hex, "ts_ms": ts_ms or int(time.time() * 1000), "service": service,
            "host": host, "type": etype, "message": message,
            "frames": [frame("starlette.routing", "handle", 200, in_app=False),
                       frame("trainer.app", "submit", 40), frame("trainer.store", func, lineno)]}


def post(c: Cluster, events: list[dict[str, Any]], role: str = "agent", **extra: Any) -> httpx.Response:
    return httpx.post(f"{c.ops_url()}/api/v1/exceptions", json={"events": events, **extra}, headers=c.auth(role),
                      timeout=10)


def get(c: Cluster, path: str, role: str = "viewer", **params: Any) -> Any:
    r = httpx.get(f"{c.ops_url()}/api/v1/exceptions{path}", params=params, headers=c.auth(role), timeout=10)
    r.raise_for_status()
    return r.json()


def act(c: Cluster, gid: str, action: str, role: str = "operator", **params: Any) -> httpx.Response:
    return httpx.post(f"{c.ops_url()}/api/v1/exceptions/groups/{gid}/{action}", params=params,
                      headers=c.auth(role), timeout=10)


def groups(c: Cluster, **params: Any) -> list[dict[str, Any]]:
    return get(c, "/groups", **params)["groups"]


def test_grouping_ignores_line_numbers_and_hosts_but_not_functions(disp: Cluster) -> None:
    r = post(disp, [event("host-1", lineno=10), event("host-2", lineno=57, message="'user-18'"),
                    event("host-1", func="save", lineno=10)])
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 3, "duplicates": 0}
    gs = groups(disp, sort="count")
    assert len(gs) == 2
    same, other = gs
    assert same["count"] == 2 and same["hosts"] == ["host-1", "host-2"] and same["services"] == ["trainer"]
    assert same["culprit"] == "trainer.store.load" and same["status"] == "unresolved"
    assert other["count"] == 1 and other["culprit"] == "trainer.store.save"


def test_the_same_event_twice_is_stored_once(disp: Cluster) -> None:
    batch = [event(), event(func="save")]
    assert post(disp, batch).json() == {"accepted": 2, "duplicates": 0}
    assert post(disp, batch).json() == {"accepted": 0, "duplicates": 2}
    assert sum(g["count"] for g in groups(disp)) == 2
    assert len(get(disp, "/tail", limit=100)["items"]) == 2


def test_resolved_group_regresses_and_raises_an_event(disp: Cluster) -> None:
    post(disp, [event()])
    gid = groups(disp)[0]["id"]
    r = act(disp, gid, "resolve")
    assert r.status_code == 200, r.text
    assert r.json()["group"]["status"] == "resolved" and r.json()["by"] == "test-operator"
    post(disp, [event(lineno=99)])
    g = get(disp, f"/groups/{gid}")["group"]
    assert g["status"] == "regressed" and g["count"] == 2
    evs = httpx.get(f"{disp.ops_url()}/api/v1/events", headers=disp.auth("viewer"), timeout=5).json()
    regressions = [e for e in evs if e["kind"] == "exception_regressed"]
    assert len(regressions) == 1 and regressions[0]["target"] == gid and regressions[0]["severity"] == "warning"
    post(disp, [event()])  # still regressed: no second event
    evs = httpx.get(f"{disp.ops_url()}/api/v1/events", headers=disp.auth("viewer"), timeout=5).json()
    assert len([e for e in evs if e["kind"] == "exception_regressed"]) == 1


def test_actions_are_audited_and_need_the_operator_role(disp: Cluster) -> None:
    post(disp, [event()])
    gid = groups(disp)[0]["id"]
    assert act(disp, gid, "acknowledge", role="viewer").status_code == 403
    assert act(disp, gid, "acknowledge").json()["group"]["status"] == "acknowledged"
    muted = act(disp, gid, "mute", minutes=30).json()["group"]
    assert muted["status"] == "muted" and muted["mute_until_ms"] > time.time() * 1000 + 29 * 60_000
    assert act(disp, gid, "mute").status_code == 422  # needs minutes
    assert act(disp, gid, "assign", assignee="ana").json()["group"]["assignee"] == "ana"
    assert act(disp, "0123456789abcdef", "resolve").status_code == 404
    assert [g["id"] for g in groups(disp, status="muted")] == [gid]
    assert groups(disp, status="unresolved") == []
    audit = httpx.get(f"{disp.ops_url()}/api/v1/audit", headers=disp.auth("viewer"), timeout=5).json()
    mine = [(a["action"], a["result"]) for a in audit if a["target"].startswith("exception-group/")]
    assert ("exception_acknowledge", "ok: now acknowledged") in mine
    assert ("exception_mute", "ok: muted for 30 min") in mine
    assert ("exception_assign", "ok: assigned to ana") in mine
    assert ("resolve", "unknown group") in mine


def test_list_filters_detail_and_tail(disp: Cluster) -> None:
    first = get(disp, "/tail")
    assert first == {"items": [], "cursor": None}
    post(disp, [event("host-1", etype="ValueError", message="bad exercise id", service="trainer"),
                event("host-3", func="save", service="billing")])
    assert [g["type"] for g in groups(disp, q="billing")] == ["KeyError"]
    assert [g["type"] for g in groups(disp, q="exercise host-1")] == ["ValueError"]
    page = get(disp, "/tail")
    assert len(page["items"]) == 2 and page["cursor"] == page["items"][-1]["id"]
    post(disp, [event("host-2", message="after the cursor")])
    newer = get(disp, "/tail", after=page["cursor"])
    assert [o["event"]["message"] for o in newer["items"]] == ["after the cursor"]
    assert get(disp, "/tail", after=newer["cursor"])["items"] == []
    gid = newer["items"][0]["group_id"]
    d = get(disp, f"/groups/{gid}")
    assert d["latest"]["message"] == "after the cursor" and len(d["recent"]) == 1
    assert [f["function"] for f in d["latest"]["frames"]] == ["handle", "submit", "load"]


def test_bad_bodies_are_refused_and_nothing_is_stored(disp: Cluster) -> None:
    url = f"{disp.ops_url()}/api/v1/exceptions"
    h = {**disp.auth("agent"), "Content-Type": "application/json"}
    assert httpx.post(url, content=b"{not json", headers=h, timeout=5).status_code == 400
    wrong = event()
    wrong["ts_ms"] = "yesterday"
    r = post(disp, [wrong])
    assert r.status_code == 422 and "ts_ms" in r.json()["error"]
    assert post(disp, [{**event(), "frames": "none"}]).status_code == 422
    assert post(disp, [{**event(), "surprise": 1}]).status_code == 422
    assert post(disp, []).status_code == 422
    huge = event(message="x" * 3000)
    r = httpx.post(url, content=json.dumps({"events": [huge] * 200}), headers=h, timeout=10)
    assert r.status_code == 413
    assert post(disp, [event()], role="viewer").status_code == 403
    assert httpx.post(url, json={"events": [event()]}, timeout=5).status_code == 401
    stats = get(disp, "/stats")
    assert stats["groups"] == 0 and stats["events"] == 0


def test_sender_loss_counters_are_shown(disp: Cluster) -> None:
    post(disp, [event()], counters={"sender": "trainer@host-1#a", "dropped": 5, "corrupt": 2})
    post(disp, [event()], counters={"sender": "trainer@host-1#a", "dropped": 3, "corrupt": 2})  # older report
    post(disp, [event()], counters={"sender": "trainer@host-2#b", "dropped": 1})
    st = get(disp, "/groups")["stats"]
    assert (st["dropped"], st["corrupt"], st["rejected"]) == (6, 2, 0)
    assert st["senders_losing"] == ["trainer@host-1#a", "trainer@host-2#b"]


SENTRY_SCRIPT = """
import sys, sentry_sdk
sentry_sdk.init(dsn=sys.argv[1], server_name="billing-1", default_integrations=False, traces_sample_rate=0)
sentry_sdk.set_tag("service", "billing")

def charge_card(amount):
    return amount / 0

try:
    charge_card(12)
except ZeroDivisionError:
    sentry_sdk.capture_exception()
sentry_sdk.flush(10)
"""


def test_sentry_sdk_reports_land_in_a_group(disp: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "billing.py"
    script.write_text(SENTRY_SCRIPT)
    port = disp.ops_url().rsplit(":", 1)[1]
    for role in ("viewer", "agent"):
        dsn = f"http://{disp.tokens[role]}@127.0.0.1:{port}/7"
        subprocess.run([sys.executable, str(script), dsn], check=True, timeout=60)
    gs = groups(disp)
    assert len(gs) == 1, gs  # the viewer-keyed DSN was refused
    g = gs[0]
    assert g["type"] == "ZeroDivisionError" and g["services"] == ["billing"] and g["hosts"] == ["billing-1"]
    assert g["culprit"].endswith(".charge_card")
    latest = get(disp, f"/groups/{g['id']}")["latest"]
    assert latest["source"] == "sentry" and latest["frames"][-1]["context_line"].strip() == "return amount / 0"


def test_sentry_envelope_gzip_and_bad_envelopes(disp: Cluster) -> None:
    url = f"{disp.ops_url()}/api/3/envelope/"
    eid = uuid.uuid4().hex
    ev = {"event_id": eid, "timestamp": time.time(), "platform": "python", "server_name": "w1",
          "exception": {"values": [{"type": "OSError", "value": "disk full", "stacktrace": {"frames": [
              {"filename": "w.py", "module": "worker", "function": "flush", "lineno": 3, "in_app": True}]}}]}}
    payload = json.dumps(ev).encode()
    body = b"\n".join([json.dumps({"event_id": eid}).encode(),
                       json.dumps({"type": "event", "length": len(payload)}).encode(), payload, b""])
    auth = {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={disp.tokens['agent']}"}
    r = httpx.post(url, content=gzip.compress(body), headers={**auth, "Content-Encoding": "gzip"}, timeout=5)
    assert r.status_code == 200 and r.json() == {"id": eid}
    assert httpx.post(url, content=body, headers=auth, timeout=5).status_code == 200  # a retry: deduplicated
    assert httpx.post(url, content=b"\x00garbage", headers=auth, timeout=5).status_code == 400
    assert httpx.post(url, content=b"garbage", headers={**auth, "Content-Encoding": "gzip"}, timeout=5).status_code \
        == 400
    assert httpx.post(url, content=body, timeout=5).status_code == 401
    gs = groups(disp)
    assert len(gs) == 1 and gs[0]["count"] == 1 and gs[0]["type"] == "OSError"


def test_cli_list_show_tail(disp: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    post(disp, [event(), event(func="save")])
    args = ["--url", disp.ops_url(), "--token", disp.viewer_token, "--json"]
    assert ctops_main(["exceptions", "list", *args]) == 0
    gl = json.loads(capsys.readouterr().out)
    assert gl["total"] == 2
    gid = gl["groups"][0]["id"]
    assert ctops_main(["exceptions", "show", gid, *args]) == 0
    assert json.loads(capsys.readouterr().out)["group"]["id"] == gid
    assert ctops_main(["exceptions", "tail", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(json.loads(x)["event"]["type"] == "KeyError" for x in lines)
    assert ctops_main(["exceptions", "show", gid, "--url", disp.ops_url(), "--token", disp.viewer_token]) == 0
    text = capsys.readouterr().out
    assert "Traceback (most recent call last):" in text and "KeyError: 'user-17'" in text
    assert ctops_main(["exceptions", "show", "0123456789abcdef", *args]) == 1

"""Scoped tokens, the mutual heartbeat's credential, bounded exception ingest, body and depth limits,
and the limit on failed authentications, against real dispatchers and trainers (issue 13, 4 and 5)."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from ctops.auth import hash_token, new_token
from ctops.capture.forwarder import Forwarder
from ctops.capture.spool import Spool
from ctops.config import ConfigError, load
from ctops.keys import Keys
from tests.cluster import Cluster, wait_for
from tests.test_exceptions_api import event
from tests.test_ops_api import heartbeat

EXTRA_AGENT = new_token()  # an agent token bound to no host: exceptions only
EXTRA_TOKENS = f"""
[[tokens]]
name = "billing-reporter"
role = "agent"
sha256 = "{hash_token(EXTRA_AGENT)}"
"""


def ops_up(c: Cluster, d: str = "A") -> Cluster:
    wait_for(f"ops API of {d}", lambda: httpx.get(f"{c.ops_url(d)}/api/v1/whoami", headers=c.auth("viewer"),
                                                  timeout=2).status_code == 200)
    return c


@pytest.fixture
def disp(make_cluster: Callable[..., Cluster]) -> Cluster:
    """Dispatcher A of two (B is configured, not started), nothing behind it."""
    c = make_cluster(trainers=2, dispatchers=("A", "B"), extra_toml=EXTRA_TOKENS)
    c.start("A")
    return ops_up(c)


def redis_of(c: Cluster) -> redis.Redis:
    return redis.Redis.from_url(c.redis.url)


# --- 4. tokens are scoped ------------------------------------------------------------------------

def test_an_agent_token_speaks_only_for_its_own_host(disp: Cluster) -> None:
    url = disp.ops_url()
    r = httpx.post(f"{url}/api/v1/heartbeat", json=heartbeat("host-2"), headers=disp.auth("agent:host-1"))
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "agent token 'test-agent-host-1' is for host 'host-1', not 'host-2'"
    r = httpx.get(f"{url}/api/v1/agents/host-2/commands", params={"wait_ms": 0}, headers=disp.auth("agent:host-1"),
                  timeout=5)
    assert r.status_code == 403 and "not 'host-2'" in r.json()["error"]
    r = httpx.post(f"{url}/api/v1/agents/host-2/commands/{uuid.uuid4().hex}/result",
                   json={"ok": True, "message": "done"}, headers=disp.auth("agent:host-1"))
    assert r.status_code == 403 and "not 'host-2'" in r.json()["error"]
    r = redis_of(disp)
    assert r.hget(Keys(disp.prefix).host("host-2"), "hb") is None  # nothing stored for host-2
    r.close()
    # staff see it: one audit entry per token and host a minute, however often the agent retries
    audit = httpx.get(f"{url}/api/v1/audit", headers=disp.auth("viewer")).json()
    refused = [a for a in audit if a["action"] == "scope_refused"]
    assert len(refused) == 1 and refused[0]["who"] == "test-agent-host-1" and refused[0]["target"] == "host host-2"
    assert "token is for host host-1" in refused[0]["result"]
    # its own host, and host-2 with host-2's token, are fine
    assert httpx.post(f"{url}/api/v1/heartbeat", json=heartbeat("host-1"),
                      headers=disp.auth("agent:host-1")).status_code == 200
    assert httpx.post(f"{url}/api/v1/heartbeat", json=heartbeat("host-2"),
                      headers=disp.auth("agent:host-2")).status_code == 200
    r = httpx.get(f"{url}/api/v1/agents/host-2/commands", params={"wait_ms": 0}, headers=disp.auth("agent:host-2"),
                  timeout=5)
    assert r.status_code == 200 and r.json() == []


def test_an_agent_token_without_a_host_may_only_send_exceptions(disp: Cluster) -> None:
    h = {"Authorization": f"Bearer {EXTRA_AGENT}"}
    r = httpx.post(f"{disp.ops_url()}/api/v1/heartbeat", json=heartbeat("host-1"), headers=h)
    assert r.status_code == 403
    assert "bound to no host" in r.json()["error"] and "host" in r.json()["error"]
    r = httpx.post(f"{disp.ops_url()}/api/v1/exceptions", json={"events": [event()]}, headers=h, timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 1


def test_peer_heartbeat_needs_the_peer_credential(disp: Cluster) -> None:
    url = f"{disp.ops_url()}/api/v1/peer/heartbeat"
    hb = {"name": "B", "role": "standby", "epoch": 0, "sent_at_ms": 1}
    for role in ("agent", "agent:host-2", "operator"):
        r = httpx.post(url, json=hb, headers=disp.auth(role))
        assert r.status_code == 403, (role, r.text)
    # bound to B: it cannot speak for A
    r = httpx.post(url, json={**hb, "name": "A"}, headers=disp.auth("peer:B"))
    assert r.status_code == 403 and "not 'A'" in r.json()["error"]
    r = httpx.post(url, json=hb, headers=disp.auth("peer:B"))
    assert r.status_code == 200 and r.json()["name"] == "A"


def test_a_peer_claiming_a_huge_epoch_cannot_make_the_leader_step_down(disp: Cluster) -> None:
    wait_for("A leads", lambda: disp.state()["leader"] == "A")
    keys = Keys(disp.prefix)
    r = redis_of(disp)
    lease_before = r.get(keys.leader)
    leader_events = len([e for e in events(disp) if e["kind"] == "leader_changed"])
    url = f"{disp.ops_url()}/api/v1/peer/heartbeat"
    replies = []
    for i in range(20):
        hb = {"name": "B", "role": "leader", "epoch": 10**12 + i, "sent_at_ms": int(time.time() * 1000)}
        got = httpx.post(url, json=hb, headers=disp.auth("peer:B"))
        assert got.status_code == 200, got.text
        replies.append(got.json()["role"])
        time.sleep(0.02)
    assert replies == ["leader"] * 20
    assert r.get(keys.leader) == lease_before  # same holder, same epoch
    assert disp.state()["leader"] == "A"
    assert len([e for e in events(disp) if e["kind"] == "leader_changed"]) == leader_events
    assert "steps down" not in disp.log("A")
    r.close()


def events(c: Cluster) -> list[dict[str, Any]]:
    got = httpx.get(c.ops_url() + "/api/v1/events", params={"limit": 1000}, headers=c.auth("viewer"))
    got.raise_for_status()
    return got.json()


@pytest.mark.parametrize(("toml", "setting"), [
    ('[[tokens]]\nname = "x"\nrole = "agent"\nhost = "host-9"\nsha256 = "' + "a" * 64 + '"\n', "tokens(x).host"),
    ('[[tokens]]\nname = "x"\nrole = "viewer"\nhost = "host-1"\nsha256 = "' + "a" * 64 + '"\n', "host is only for"),
    ('[[tokens]]\nname = "x"\nrole = "peer"\ndispatcher = "Z"\nsha256 = "' + "a" * 64 + '"\n',
     "tokens(x).dispatcher"),
])
def test_a_token_scope_that_names_nothing_stops_the_program(tmp_path: Path, toml: str, setting: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[dispatchers]]\nname = "A"\ndata = "127.0.0.1:1"\nops = "127.0.0.1:2"\n'
                    '[[agents]]\nname = "host-1"\n' + toml)
    with pytest.raises(ConfigError, match=r"(?s)" + setting.replace("(", r"\(").replace(")", r"\)")):
        load(path)


# --- 5. failed authentications, wait_ms ----------------------------------------------------------

def from_address(addr: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=addr), timeout=5)


def test_failed_authentications_are_limited_per_address_and_audited(disp: Cluster) -> None:
    url = f"{disp.ops_url()}/api/v1/state"
    secret = "guess-" + new_token()
    with from_address("127.0.0.2") as attacker, from_address("127.0.0.3") as other:
        codes = [attacker.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code for _ in range(20)]
        assert codes[:10] == [401] * 10 and codes[10:] == [429] * 10
        r = attacker.get(url, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
        assert r.json()["error"] == "too many failed authentications from this address"
        # another address is not affected, and a valid token still works from the limited one
        assert other.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 401
        assert attacker.get(url, headers=disp.auth("viewer")).status_code == 200
    audit = httpx.get(f"{disp.ops_url()}/api/v1/audit", params={"limit": 1000}, headers=disp.auth("viewer")).json()
    mine = [a for a in audit if a["target"] == "address 127.0.0.2"]
    assert [a["action"] for a in mine].count("auth_failed") == 10
    assert [a["action"] for a in mine].count("auth_blocked") == 1
    assert all(a["ts_ms"].isdigit() for a in mine)
    assert secret not in json.dumps(audit)


def test_command_poll_with_wait_ms_0_answers_at_once_and_wait_ms_is_bounded(disp: Cluster) -> None:
    url = f"{disp.ops_url()}/api/v1/agents/host-1/commands"
    r = httpx.get(url, params={"wait_ms": 0}, headers=disp.auth("agent"), timeout=5)
    assert r.status_code == 200 and r.json() == []
    for bad in (-1, 30_001, "x"):
        r = httpx.get(url, params={"wait_ms": bad}, headers=disp.auth("agent"), timeout=5)
        assert r.status_code == 422 and "wait_ms" in r.json()["error"], r.text


def test_wrong_method_gets_405_with_allow(disp: Cluster) -> None:
    r = httpx.delete(f"{disp.ops_url()}/api/v1/state", headers=disp.auth("viewer"))
    assert r.status_code == 405 and r.headers["Allow"] == "GET"
    assert set(r.json()) == {"error", "detail"}


# --- 5. bounded exception ingest ------------------------------------------------------------------

LIMITED = """
[limits]
exceptions_per_s = 1
exceptions_burst = 120
exceptions_max_groups = 50
"""


@pytest.fixture
def limited(make_cluster: Callable[..., Cluster]) -> Cluster:
    c = make_cluster(trainers=2, extra_toml=LIMITED)
    c.start("A")
    return ops_up(c)


def post(c: Cluster, evs: list[dict[str, Any]], role: str = "agent") -> httpx.Response:
    return httpx.post(f"{c.ops_url()}/api/v1/exceptions", json={"events": evs}, headers=c.auth(role), timeout=10)


def group_types(c: Cluster) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{c.ops_url()}/api/v1/exceptions/groups", params={"limit": 5000}, headers=c.auth("viewer"))
    r.raise_for_status()
    return {g["culprit"].rsplit(".", 1)[-1]: g for g in r.json()["groups"]}


def test_exception_flood_is_rate_limited_and_groups_are_capped_with_ttls(limited: Cluster) -> None:
    c = limited
    now = int(time.time() * 1000)
    # 49 groups, then a 50th (the newest) that staff resolve
    assert post(c, [event(func=f"old{i}", ts_ms=now - 100_000 + i) for i in range(49)]).status_code == 200
    assert post(c, [event(func="fixed", ts_ms=now)]).status_code == 200
    gid = group_types(c)["fixed"]["id"]
    assert httpx.post(f"{c.ops_url()}/api/v1/exceptions/groups/{gid}/resolve",
                      headers=c.auth("operator")).status_code == 200
    # one more group: the resolved one goes first, though it is the newest
    assert post(c, [event(func="new1", ts_ms=now + 1)]).status_code == 200
    g = group_types(c)
    assert len(g) == 50 and "fixed" not in g and {"old0", "new1"} <= set(g)
    # then the oldest
    assert post(c, [event(func="new2", ts_ms=now + 2)]).status_code == 200
    g = group_types(c)
    assert len(g) == 50 and "old0" not in g and {"old1", "new2"} <= set(g)
    # the flood: the token's burst runs out, and 429 says when to come back
    codes = []
    for i in range(40):
        r = post(c, [event(func=f"flood{i}-{j}", ts_ms=now + 10 + j) for j in range(10)])
        codes.append(r.status_code)
        if r.status_code == 429:
            break
    assert codes[-1] == 429 and set(codes[:-1]) == {200}, codes
    assert int(r.headers["Retry-After"]) >= 1 and "rate limit" in r.json()["error"]
    # the Sentry endpoint shares the token's budget and speaks Sentry's header
    envelope = b'{}\n{"type":"event"}\n' + json.dumps({"event_id": uuid.uuid4().hex, "message": "x"}).encode()
    r = httpx.post(f"{c.ops_url()}/api/7/envelope/", content=envelope,
                   headers={"X-Sentry-Auth": f"Sentry sentry_key={c.tokens['agent']}"})
    assert r.status_code == 429 and r.headers["X-Sentry-Rate-Limits"].endswith(":error;default:key")
    assert int(r.headers["X-Sentry-Rate-Limits"].split(":")[0]) >= 1
    # another host's token has its own budget
    assert post(c, [event(func="other-host")], role="agent:host-2").status_code == 200
    stats = httpx.get(f"{c.ops_url()}/api/v1/exceptions/stats", headers=c.auth("viewer")).json()
    assert stats["groups"] <= 50
    # every key the exceptions store wrote expires, and together they stay small
    r = redis_of(c)
    keys = list(r.scan_iter(f"{c.prefix}:exc:*", count=1000))
    group_keys = [k for k in keys if re.search(rb":exc:group:[0-9a-f]{16}$", k)]
    assert len(group_keys) <= 50
    no_ttl = [k for k in keys if r.ttl(k) == -1]
    assert no_ttl == []
    used = sum(r.memory_usage(k) or 0 for k in keys)
    assert used < 2 * 1024 * 1024, used
    r.close()


def test_rate_limited_events_from_the_capture_library_are_delayed_not_lost(make_cluster: Callable[..., Cluster],
                                                                             tmp_path: Path) -> None:
    c = make_cluster(trainers=1, extra_toml="[limits]\nexceptions_per_s = 40\nexceptions_burst = 50\n")
    c.start("A")
    ops_up(c)
    spool = Spool(tmp_path / "spool", fsync=False)
    seen = CountingTransport()
    fw = Forwarder([c.ops_url()], c.tokens["agent"], spool, sender="trainer@host-1", batch_max=50, transport=seen)
    fw.start()
    try:
        for i in range(300):
            fw.submit(json.dumps(event(func=f"f{i % 7}")).encode())
        assert fw.flush(timeout=90)
    finally:
        fw.close()
    stats = httpx.get(f"{c.ops_url()}/api/v1/exceptions/stats", headers=c.auth("viewer")).json()
    assert stats["events"] == 300 and stats["dropped"] == 0 and stats["rejected"] == 0
    assert seen.statuses[429] > 0  # the limit was hit on the way, and the forwarder kept the events
    assert fw.sent == 300


class CountingTransport(httpx.BaseTransport):
    """A real HTTP transport that counts the statuses it saw."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.statuses: Counter[int] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.inner.handle_request(request)
        self.statuses[r.status_code] += 1
        return r

    def close(self) -> None:
        self.inner.close()


def test_a_huge_event_is_stored_trimmed(disp: Cluster) -> None:
    huge = event(message="m" * 4000)
    huge["frames"] = [{"filename": f"/srv/{'d' * 900}/f{i}.py", "module": f"pkg.mod{i}", "function": f"fn{i}",
                       "lineno": i, "in_app": True, "context_line": "x" * 1000} for i in range(60)]
    huge["context"] = {f"key{i}": "v" * 500 for i in range(40)}
    assert len(json.dumps(huge)) > 100_000
    r = httpx.post(f"{disp.ops_url()}/api/v1/exceptions", json={"events": [huge]}, headers=disp.auth("agent"),
                   timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 1
    gid = httpx.get(f"{disp.ops_url()}/api/v1/exceptions/groups", headers=disp.auth("viewer")).json()["groups"][0]["id"]
    latest = httpx.get(f"{disp.ops_url()}/api/v1/exceptions/groups/{gid}", headers=disp.auth("viewer")).json()["latest"]
    # the innermost frames (where it was raised) are kept, and the trimming is said
    assert [f["function"] for f in latest["frames"]][-1] == "fn59" and len(latest["frames"]) == 20
    assert latest["context"]["ctops_trimmed"].startswith("stored trimmed from")
    assert len(json.dumps(latest)) <= 16 * 1024


def test_deeply_nested_json_is_a_400_and_the_dispatcher_stays_up(disp: Cluster) -> None:
    bomb = b"[" * 100_000 + b"]" * 100_000
    h = {**disp.auth("agent"), "Content-Type": "application/json"}
    sentry = {"X-Sentry-Auth": f"Sentry sentry_key={disp.tokens['agent']}"}
    url = disp.ops_url()
    cases = [
        httpx.post(f"{url}/api/7/envelope/", content=b'{}\n{"type":"event"}\n' + bomb, headers=sentry),
        httpx.post(f"{url}/api/7/envelope/", content=bomb + b"\n", headers=sentry),
        httpx.post(f"{url}/api/7/store/", content=bomb, headers=sentry),
        # under the interpreter's limit but over ours: refused by depth, not by the stack
        httpx.post(f"{url}/api/7/store/", headers=sentry, content=b'{"event_id": "%s", "message": "m", "extra": '
                   b'{"a": %s}}' % (uuid.uuid4().hex.encode(), b"[" * 200 + b"]" * 200)),
        httpx.post(f"{url}/api/v1/exceptions", content=b'{"events": ' + bomb + b"}", headers=h),
        httpx.post(f"{url}/api/v1/heartbeat", content=bomb, headers=h),
    ]
    assert [r.status_code for r in cases] == [400] * len(cases), [r.text[:200] for r in cases]
    assert all(set(r.json()) == {"error", "detail"} for r in cases)
    assert "nested deeper than 64 levels" in cases[3].json()["error"]
    assert httpx.get(f"{url}/api/v1/whoami", headers=disp.auth("viewer")).status_code == 200


# --- 5. one body limit everywhere, chunked bodies counted -----------------------------------------

def send_chunked(url: str, path: str, total: int, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST `total` bytes as a chunked body over a raw socket; (status, body) of the answer, which may
    come before the body is all sent."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    s.sendall(head.encode())
    chunk = b"x" * 65536
    sent = 0
    try:
        while sent < total:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        s.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed early: read what it said
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        got = s.recv(65536)
        if not got:
            break
        data += got
    s.close()
    head_end = data.index(b"\r\n\r\n")
    return int(data.split(b" ", 2)[1]), data[head_end + 4:]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_chunked_oversized_body_is_refused_by_the_trainer_and_the_ops_api(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    trainer = c.children["trainer-1"]
    rss_before = psutil.Process(trainer.pid).memory_info().rss
    status, body = send_chunked(c.trainer_url("trainer-1"), "/api/sessions", 60 * 1024 * 1024, {})
    assert status == 413 and "too large" in json.loads(body)["detail"]
    # the body was never held in memory, and the server still serves
    assert psutil.Process(trainer.pid).memory_info().rss - rss_before < 20 * 1024 * 1024
    assert httpx.get(c.trainer_url("trainer-1") + "/healthz", timeout=5).status_code == 200
    assert httpx.post(c.trainer_url("trainer-1") + "/api/sessions", json={}, timeout=5).status_code == 201
    status, body = send_chunked(c.ops_url(), "/api/v1/heartbeat", 20 * 1024 * 1024,
                                {"Authorization": f"Bearer {c.tokens['agent']}"})
    assert status == 413 and json.loads(body)["error"].startswith("request body over")
    assert c.state()["leader"] == "A"
    # the LLM pool behind the data port: the same limit code, in OpenAI's error shape
    status, body = send_chunked(c.data_url(), "/llm/v1/chat/completions", 4 * 1024 * 1024, {})
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    models = httpx.get(c.data_url() + "/llm/v1/models", timeout=5)
    assert models.status_code == 200 and models.json()["data"]

"""Ops API: every endpoint refuses a missing token (401) and a wrong role (403); bad bodies get a
clear 4xx naming the field, and nothing is stored; staff actions are audited."""

from __future__ import annotations

import httpx
import pytest
import redis

from ctops.keys import Keys
from tests.cluster import Cluster, wait_for

# every route of the ops API (as its OpenAPI document publishes it) -> a concrete path to try and the
# grant it needs; `test_the_auth_matrix_covers_every_route` fails when a route is added without a row
ROUTES: dict[tuple[str, str], tuple[str, str | None]] = {
    ("GET", "/api/v1/whoami"): ("/api/v1/whoami", None),
    ("POST", "/api/v1/heartbeat"): ("/api/v1/heartbeat", "agent"),
    ("GET", "/api/v1/state"): ("/api/v1/state", "read"),
    ("GET", "/api/v1/state/changes"): ("/api/v1/state/changes?since=x", "read"),
    ("GET", "/metrics"): ("/metrics", "metrics"),
    ("GET", "/api/v1/audit"): ("/api/v1/audit", "read"),
    ("POST", "/api/v1/servers/{name}/{action}"): ("/api/v1/servers/trainer-1/drain", "act"),
    ("POST", "/api/v1/peer/heartbeat"): ("/api/v1/peer/heartbeat", "peer"),
    ("POST", "/api/v1/dispatchers/{name}/{action}"): ("/api/v1/dispatchers/A/step-down", "act"),
    ("GET", "/api/v1/events"): ("/api/v1/events?limit=5", "read"),
    ("POST", "/api/v1/hosts/{host}/processes/{process}/{action}"):
        ("/api/v1/hosts/host-1/processes/trainer-1/restart", "act"),
    ("GET", "/api/v1/agents/{host}/commands"): ("/api/v1/agents/host-1/commands?wait_ms=0", "agent"),
    ("POST", "/api/v1/agents/{host}/commands/{cmd_id}/result"):
        ("/api/v1/agents/host-1/commands/abc123/result", "agent"),
    ("POST", "/api/v1/exceptions"): ("/api/v1/exceptions", "ingest"),
    ("GET", "/api/v1/exceptions/groups"): ("/api/v1/exceptions/groups", "read"),
    ("GET", "/api/v1/exceptions/stats"): ("/api/v1/exceptions/stats", "read"),
    ("GET", "/api/v1/exceptions/groups/{gid}"): ("/api/v1/exceptions/groups/abc123", "read"),
    ("GET", "/api/v1/exceptions/tail"): ("/api/v1/exceptions/tail", "read"),
    ("POST", "/api/v1/exceptions/groups/{gid}/{action}"): ("/api/v1/exceptions/groups/abc123/acknowledge", "act"),
    ("POST", "/api/{project_id}/envelope/"): ("/api/1/envelope/", "ingest"),
    ("POST", "/api/{project_id}/store/"): ("/api/1/store/", "ingest"),
    ("GET", "/api/v1/store/integrity"): ("/api/v1/store/integrity", "read"),
    ("POST", "/api/v1/store/quarantine/{qid}/{action}"): ("/api/v1/store/quarantine/abc123/discard", "act"),
    ("GET", "/api/v1/llm/providers"): ("/api/v1/llm/providers", "read"),
    ("POST", "/api/v1/llm/providers/{name}/{action}"): ("/api/v1/llm/providers/primary/pin", "act"),
    ("GET", "/api/v1/store"): ("/api/v1/store", "read"),
    ("POST", "/api/v1/store/failover"): ("/api/v1/store/failover", "act"),
}
ENDPOINTS = [(method, path, grant) for (method, _), (path, grant) in ROUTES.items()]
ALL_ROLES = ("viewer", "operator", "agent", "peer")
ROLES = {"read": {"viewer", "operator"}, "metrics": {"viewer", "operator"},
         "act": {"operator"}, "agent": {"agent"}, "ingest": {"agent"},
         "peer": {"peer"}, None: set(ALL_ROLES)}


def heartbeat(host: str = "host-1", **over: object) -> dict:
    hb = {"host": host, "seq": 1, "sent_at_ms": 1, "processes": [],
          "metrics": {"cpu_percent": 1.0, "memory_percent": 2.0, "memory_used_bytes": 3, "disk_percent": 4.0,
                      "load1": 0.1, "load5": 0.1, "load15": 0.1}}
    hb.update(over)
    return hb


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_server) -> Cluster:
    # this module's tests send many bad tokens on purpose; the limit on them has its own test
    c = Cluster(tmp_path_factory.mktemp("ops"), redis_server, "ops-api-test", trainers=2,
                extra_toml="[limits]\nauth_failures_per_minute = 100000")
    for n in c.server_names:
        c.start(n)
    c.start("A")
    c.wait_all_up()
    yield c
    c.stop()


def snapshot(c: Cluster) -> dict:
    """Everything the ops API may write, to show a refused request changed nothing."""
    r = redis.Redis.from_url(c.redis.url)
    k = Keys(c.prefix)
    out = {
        "admin": [r.hget(k.server(n), "admin") for n in c.server_names],
        "hosts": sorted(r.smembers(k.hosts)),
        "host1": r.hget(k.host("host-1"), "hb"),
        # refused tokens and scopes are audited on purpose; staff actions must not be
        "audit": sum(1 for _, f in r.xrange(k.audit)
                     if not f[b"action"].startswith(b"auth_") and f[b"action"] != b"scope_refused"),
    }
    r.close()
    return out


def test_the_auth_matrix_covers_every_route(cluster: Cluster) -> None:
    """The routes the running ops API publishes are exactly those the matrix below tests."""
    doc = httpx.get(cluster.ops_url() + "/api/v1/openapi.json").json()
    published = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert published - set(ROUTES) == set(), "routes without an auth test: add them to ROUTES"
    assert set(ROUTES) - published == set(), "ROUTES names routes the API no longer has"


@pytest.mark.parametrize(("method", "path", "grant"), ENDPOINTS)
def test_every_endpoint_needs_a_token_and_the_right_role(cluster: Cluster, method: str, path: str, grant) -> None:
    before = snapshot(cluster)
    body = {"name": "A", "role": "standby", "epoch": 0, "sent_at_ms": 1} if path.endswith("peer/heartbeat") \
        else heartbeat() if path.endswith("heartbeat") else None
    url = cluster.ops_url() + path
    # Sentry's routes take the token as the DSN's public key, the others as a bearer token
    sentry = "{project_id}" in next(k[1] for k, v in ROUTES.items() if v[0] == path)

    def cred(token: str) -> dict[str, str]:
        return {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={token}"} if sentry \
            else {"Authorization": f"Bearer {token}"}

    for headers in ({}, cred("not-a-token"), {"Authorization": "Basic abc"}):
        r = httpx.request(method, url, json=body, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"] == "invalid token" or r.json()["error"].startswith("missing "), r.text
    for role in ALL_ROLES:
        if role in ROLES[grant]:
            continue
        r = httpx.request(method, url, json=body, headers=cred(cluster.auth(role)["Authorization"].split()[1]))
        assert r.status_code == 403, (path, role, r.text)
        assert r.json()["error"], (path, role, r.text)
    assert snapshot(cluster) == before


@pytest.mark.parametrize(("content", "status", "field"), [
    (b"{not json", 400, None),
    (b"[]", 422, None),
    (b'{"host": "host-1"}', 422, "body.seq"),
    (b'{"host": 5, "seq": "x", "sent_at_ms": 1, "metrics": {}}', 422, "body.host"),
    (b'{"host": "host-1", "seq": 1, "sent_at_ms": 1, "metrics": {"cpu_percent": "lots"}}', 422,
     "body.metrics.cpu_percent"),
    (b"x" * (300 * 1024), 413, None),
])
def test_malformed_heartbeats_are_refused_and_nothing_is_stored(cluster: Cluster, content: bytes, status: int,
                                                                field: str | None) -> None:
    before = snapshot(cluster)
    r = httpx.post(cluster.ops_url() + "/api/v1/heartbeat", content=content,
                   headers={**cluster.auth("agent"), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]
    if field:
        assert field in r.json()["error"]
    assert snapshot(cluster) == before


def test_oversized_chunked_body_is_refused(cluster: Cluster) -> None:
    before = snapshot(cluster)

    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    r = httpx.post(cluster.ops_url() + "/api/v1/heartbeat", content=chunks(),
                   headers={**cluster.auth("agent"), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert snapshot(cluster) == before


def test_heartbeat_for_a_host_other_than_the_tokens_is_refused(cluster: Cluster) -> None:
    before = snapshot(cluster)
    r = httpx.post(cluster.ops_url() + "/api/v1/heartbeat", json=heartbeat("intruder"), headers=cluster.auth("agent"))
    assert r.status_code == 403 and "not 'intruder'" in r.json()["error"]
    assert snapshot(cluster) == before


def test_heartbeat_is_stored_and_shown(cluster: Cluster) -> None:
    r = httpx.post(cluster.ops_url() + "/api/v1/heartbeat", json=heartbeat("host-2", seq=7),
                   headers=cluster.auth("agent:host-2"))
    assert r.status_code == 200, r.text
    host = next(h for h in cluster.state()["hosts"] if h["name"] == "host-2")
    assert host["seq"] == 7 and host["state"] == "alive" and host["metrics"]["disk_percent"] == 4.0


def test_actions_change_state_and_are_audited(cluster: Cluster) -> None:
    op = cluster.auth("operator")
    r = httpx.post(cluster.ops_url() + "/api/v1/servers/trainer-2/drain", headers=op)
    assert r.status_code == 200 and r.json()["state"] == "draining" and r.json()["by"] == "test-operator"
    assert cluster.server("trainer-2")["state"] == "draining"
    r = httpx.post(cluster.ops_url() + "/api/v1/servers/trainer-2/disable", headers=op)
    assert cluster.server("trainer-2")["state"] == "disabled"
    r = httpx.post(cluster.ops_url() + "/api/v1/servers/trainer-2/enable", headers=op)
    assert r.json()["state"] == "up"
    wait_for("trainer-2 up", lambda: cluster.server("trainer-2")["state"] == "up")
    r = httpx.post(cluster.ops_url() + "/api/v1/servers/nope/drain", headers=op)
    assert r.status_code == 404 and "unknown server" in r.json()["error"]
    r = httpx.post(cluster.ops_url() + "/api/v1/servers/trainer-2/reboot", headers=op)
    assert r.status_code == 422
    audit = httpx.get(cluster.ops_url() + "/api/v1/audit", headers=cluster.auth("viewer")).json()
    mine = [(a["action"], a["target"], a["who"]) for a in audit][:4][::-1]
    assert mine == [("drain", "trainer-2", "test-operator"), ("disable", "trainer-2", "test-operator"),
                    ("enable", "trainer-2", "test-operator"), ("drain", "nope", "test-operator")]
    assert all(a["ts_ms"].isdigit() and a["result"] for a in audit[:4])


def test_openapi_document_is_served(cluster: Cluster) -> None:
    doc = httpx.get(cluster.ops_url() + "/api/v1/openapi.json").json()
    assert {"/api/v1/heartbeat", "/api/v1/state", "/api/v1/servers/{name}/{action}"} <= set(doc["paths"])

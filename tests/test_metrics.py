"""Prometheus: `GET /metrics` on a dispatcher's ops port and on an agent's metrics port, scraped from a
real cluster (agents supervising trainers, the data plane proxying), and the dashboard and alert rules
shipped in deploy/ referring only to metrics those scrapes export."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ctops.auth import new_token
from ctops_tools.redis_embed import EmbeddedRedis
from tests.cluster import Cluster, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("metrics")
    c = Cluster(root, redis_server, f"t{os.getpid()}:metrics:{root.name}", trainers=2, hosts_with_agents=True,
                agent_metrics=True, tokens={r: new_token() for r in ("operator", "viewer", "scrape")})
    try:
        c.start_all()
        yield c
    finally:
        c.stop()


def parse(text: str) -> tuple[set[str], Samples]:
    """(every name declared or sampled, {(sample name, labels): value})."""
    names: set[str] = set()
    samples: Samples = {}
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        for s in fam.samples:
            names.add(s.name)
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(c: Cluster, role: str = "scrape") -> tuple[set[str], Samples]:
    r = httpx.get(c.ops_url() + "/metrics", headers={"Authorization": f"Bearer {c.tokens[role]}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def scrape_agent(c: Cluster, host: str) -> tuple[set[str], Samples]:
    r = httpx.get(f"http://127.0.0.1:{c.ports[host + '.metrics']}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return parse(r.text)


def test_metrics_need_a_token_and_a_scrape_token_reads_nothing_else(cluster: Cluster) -> None:
    c = cluster
    missing = httpx.get(c.ops_url() + "/metrics", timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]
    wrong = httpx.get(c.ops_url() + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    agent = httpx.get(c.ops_url() + "/metrics", headers=c.auth("agent"), timeout=10)
    assert agent.status_code == 403 and agent.json()["detail"] == {"needs": "metrics"}
    scraper = {"Authorization": f"Bearer {c.tokens['scrape']}"}
    assert httpx.get(c.ops_url() + "/api/v1/state", headers=scraper, timeout=10).status_code == 403
    # the viewer's token works too: a person can look without another credential
    scrape(c, "viewer")


def test_dispatcher_scrape_shows_servers_leadership_hosts_and_traffic(cluster: Cluster) -> None:
    c = cluster
    for _ in range(20):
        httpx.get(c.data_url() + "/", timeout=10)
    _, s = wait_for("every server up, both hosts alive, their trainers running and the 20 requests counted",
                    lambda: (got := scrape(c)) and all(
                        value(got[1], "ctops_server_status", server=n, state="up") == 1 for n in c.server_names)
                    and value(got[1], "ctops_hosts", state="alive") == 2
                    and value(got[1], "ctops_processes", state="running") == 2
                    and (value(got[1], "ctops_frontend_http_requests_total") or 0) >= 20 and got, timeout=60)
    assert value(s, "ctops_server_status", server="trainer-1", state="down") == 0
    # only hosts and processes in trouble have a series of their own
    assert not [k for k in s if k[0] in ("ctops_host_state", "ctops_process_state")]
    assert value(s, "ctops_backend_active_servers") == 2
    assert value(s, "ctops_dispatcher_is_leader", dispatcher="A") == 1
    assert value(s, "ctops_leader_known") == 1
    assert (value(s, "ctops_dispatcher_epoch", dispatcher="A") or 0) >= 1
    assert (value(s, "ctops_host_heartbeat_age_seconds", host="host-1") or 99) < 30
    assert value(s, "ctops_llm_provider_state", provider="primary", state="up") == 1
    assert value(s, "ctops_store_up") == 1
    assert any(k[0] == "process_resident_memory_bytes" for k in s)

    # a staff action shows at the next scrape, as HAProxy's MAINT would
    httpx.post(c.ops_url() + "/api/v1/servers/trainer-2/disable", headers=c.auth("operator"),
               timeout=10).raise_for_status()
    try:
        wait_for("trainer-2 shown disabled", lambda: (got := scrape(c)[1]) and value(
            got, "ctops_server_status", server="trainer-2", state="disabled") == 1
            and value(got, "ctops_backend_active_servers") == 1)
    finally:
        httpx.post(c.ops_url() + "/api/v1/servers/trainer-2/enable", headers=c.auth("operator"),
                   timeout=10).raise_for_status()


def test_a_stopped_process_gets_a_series_of_its_own_until_it_runs_again(cluster: Cluster) -> None:
    c = cluster
    act = "/api/v1/hosts/host-2/processes/trainer-2/"
    httpx.post(c.ops_url() + act + "stop", headers=c.auth("operator"), timeout=30).raise_for_status()
    try:
        s = wait_for("trainer-2 shown stopped", lambda: (got := scrape(c)[1]) and value(
            got, "ctops_process_state", host="host-2", process="trainer-2", state="stopped") == 1 and got)
        assert value(s, "ctops_processes", state="stopped") == 1
    finally:
        httpx.post(c.ops_url() + act + "start", headers=c.auth("operator"), timeout=30).raise_for_status()
    wait_for("trainer-2 running again, its series gone", lambda: (got := scrape(c)[1]) and value(
        got, "ctops_processes", state="running") == 2 and not [k for k in got if k[0] == "ctops_process_state"])


def test_agent_port_shows_its_processes_and_host(cluster: Cluster) -> None:
    names, s = wait_for("host-1's agent reports trainer-1 running", lambda: (got := scrape_agent(cluster, "host-1"))
                        and value(got[1], "ctops_process_state", host="host-1", process="trainer-1",
                                  state="running") == 1 and got)
    assert value(s, "ctops_process_state", host="host-1", process="trainer-1", state="fatal") == 0
    assert (value(s, "ctops_process_resident_memory_bytes", host="host-1", process="trainer-1") or 0) > 0
    assert value(s, "ctops_agent_watchdog_thread_alive", host="host-1", thread="checker") == 1
    assert (value(s, "ctops_agent_heartbeats_total", host="host-1") or 0) >= 1
    assert "ctops_host_cpu_seconds_total" in names


# --- deploy/: the dashboard and the alert rules -----------------------------------------------------

METRIC = re.compile(r"\b(ctops_[a-z0-9_]+|process_[a-z0-9_]+)\b")


def dashboard_exprs() -> list[str]:
    doc = json.loads((DEPLOY / "grafana" / "ctops.json").read_text())
    assert doc["uid"] and doc["title"]
    return [t["expr"] for panel in doc["panels"] for t in panel["targets"]]


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_dashboard_and_alerts_refer_only_to_exported_metrics(cluster: Cluster) -> None:
    exported = scrape(cluster)[0] | scrape_agent(cluster, "host-1")[0]
    panels = dashboard_exprs()
    rules = alert_rules()
    assert len(panels) >= 10 and len(rules) >= 8
    for where, expr in [*(("dashboard", e) for e in panels), *((r["alert"], r["expr"]) for r in rules)]:
        used = set(METRIC.findall(expr))
        assert used, f"{where}: {expr!r} uses no ctops metric"
        unknown = used - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by a dispatcher or an agent"
    # what the issue asks the rules to catch, each with a severity and words for the person paged
    names = {r["alert"] for r in rules}
    for needed in ("CtopsServerDown", "CtopsNoLeader", "CtopsEpochJumps", "CtopsAgentLost", "CtopsCrashLoop",
                   "CtopsLLMAllProvidersOpen", "CtopsStoreFailover", "CtopsExceptionSpike"):
        assert needed in names
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]

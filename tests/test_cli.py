"""`ctops` for scripts, run as a script runs it (a subprocess, real pipes) against a real cluster:
`ctops status` verdicts as exit codes, the same exit codes across subcommands (README, "Exit
codes"), a reader that leaves early, a refused token, and exception triage by several and short ids."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ctops.capture.fingerprint import fingerprint
from ctops.opsclient import OpsClient, Unreachable
from ctops_tools.exitcodes import AUTH, CRITICAL, DEGRADED, FAILED, OK, UNKNOWN, UNREACHABLE, USAGE
from ctops_tools.procs import ctops_argv
from ctops_tools.redis_embed import free_port
from tests.cluster import Cluster, wait_for


def ctops(c: Cluster, *argv: str, token: str | None = None, role: str = "viewer",
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ctops ARGV --url A` with the role's token (or `token`; "" for none given)."""
    tok = c.tokens[role] if token is None else token
    args = [*argv, "--url", c.ops_url()] + (["--token", tok] if tok else [])
    environ = {k: v for k, v in os.environ.items() if k != "CTOPS_TOKEN"} | (env or {})
    return subprocess.run(ctops_argv(*args), capture_output=True, text=True, timeout=120, env=environ)


def post_action(c: Cluster, path: str) -> None:
    r = httpx.post(f"{c.ops_url()}/api/v1{path}", headers=c.auth("operator"), timeout=30)
    assert r.status_code == 200, r.text


def verdict(r: subprocess.CompletedProcess[str]) -> str:
    return r.stdout.splitlines()[-1] if r.stdout else ""


@pytest.mark.quick_timings
def test_status_exit_codes_follow_capacity_and_hosts(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(hosts_with_agents=True)
    c.start_all()
    wait_for("hosts alive", lambda: {h["state"] for h in c.state()["hosts"]} == {"alive"}, 60)
    wait_for("healthy", lambda: ctops(c, "status").returncode == OK, 60)

    # every server disabled: learners get 503, however healthy each server is
    for s in c.server_names:
        post_action(c, f"/servers/{s}/disable")
    r = ctops(c, "status")
    assert r.returncode == CRITICAL, r.stdout + r.stderr
    assert verdict(r).startswith("status: CRITICAL - no server up; trainer-1 disabled")
    q = ctops(c, "status", "--quiet")
    assert (q.returncode, q.stdout, q.stderr) == (CRITICAL, "", "")
    for s in c.server_names:
        post_action(c, f"/servers/{s}/enable")
    wait_for("healthy again", lambda: ctops(c, "status").returncode == OK, 30)

    # reviews: one LLM provider out is degraded, the last one too is critical
    post_action(c, "/llm/providers/primary/disable")
    r = wait_for("degraded", lambda: (r := ctops(c, "status")).returncode == DEGRADED and r, 30)
    assert "LLM provider primary disabled" in verdict(r)
    post_action(c, "/llm/providers/secondary/disable")
    r = wait_for("critical", lambda: (r := ctops(c, "status")).returncode == CRITICAL and r, 30)
    assert "no LLM provider can answer" in verdict(r)
    for p in ("primary", "secondary"):
        post_action(c, f"/llm/providers/{p}/enable")
    wait_for("healthy again", lambda: ctops(c, "status").returncode == OK, 30)

    # a host lost while the others serve: degraded
    c.signal("host-3", signal.SIGKILL)
    r = wait_for("host lost", lambda: (r := ctops(c, "status")).returncode == DEGRADED
                 and "host host-3 lost" in r.stdout and r, 60)
    assert verdict(r).startswith("status: DEGRADED")

    # no dispatcher: the check says CRITICAL; every other command says it could not reach one (3)
    c.signal("A", signal.SIGKILL)
    r = wait_for("dispatcher gone", lambda: (r := ctops(c, "status")).returncode == CRITICAL and r, 30)
    assert "no dispatcher answered" in r.stderr and "Traceback" not in r.stderr
    for argv in (("exceptions", "list"), ("exceptions", "tail"), ("exceptions", "show", "0123456789abcdef")):
        r = ctops(c, *argv)
        assert r.returncode == UNREACHABLE, (argv, r.stderr)
        assert "no dispatcher answered" in r.stderr and "Traceback" not in r.stderr


# --- exceptions on the shared cluster: each test its own exception types ---------------------------

def exc_event(etype: str, func: str = "load") -> dict[str, Any]:
    frames = [{"filename": "/srv/app/trainer/store.py", "module": "trainer.store", "function": func,
               "lineno": 10, "in_app": True, "context_line": "load()"}]
    return {"event_id": uuid.uuid4().hex, "ts_ms": int(time.time() * 1000), "service": "trainer", "host": "host-1",
            "type": etype, "message": f"{etype} happened", "frames": frames}


def ingest(c: Cluster, *events: dict[str, Any]) -> list[str]:
    """The events stored; their groups' ids (one event a group), in the order given."""
    post_events(c, *events)
    return [group_id(c, e["type"]) for e in events]


def post_events(c: Cluster, *events: dict[str, Any]) -> None:
    r = httpx.post(f"{c.ops_url()}/api/v1/exceptions", json={"events": list(events)}, headers=c.auth("agent"),
                   timeout=10)
    assert r.status_code == 200, r.text


def group_id(c: Cluster, etype: str) -> str:
    r = httpx.get(f"{c.ops_url()}/api/v1/exceptions/groups", params={"q": etype}, headers=c.auth("viewer"),
                  timeout=10)
    r.raise_for_status()
    (g,) = [g for g in r.json()["groups"] if g["type"] == etype]
    return str(g["id"])


def group(c: Cluster, gid: str) -> dict[str, Any]:
    r = httpx.get(f"{c.ops_url()}/api/v1/exceptions/groups/{gid}", headers=c.auth("viewer"), timeout=10)
    r.raise_for_status()
    return r.json()["group"]


def colliding_types(tag: str) -> tuple[str, str]:
    """Two exception types whose groups' ids share their first 6 hex digits (a birthday search:
    about 4,000 tries for 24 bits)."""
    seen: dict[str, str] = {}
    for i in range(200_000):
        etype = f"E{tag}{i}"
        e = exc_event(etype)
        prefix = fingerprint(etype, e["frames"], e["message"])[:6]
        if prefix in seen:
            return seen[prefix], etype
        seen[prefix] = etype
    raise AssertionError("no collision found")


def test_triage_several_ids_and_short_ids(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    tag = uuid.uuid4().hex[:8]
    a, b, d = ingest(c, exc_event(f"A{tag}"), exc_event(f"B{tag}"), exc_event(f"D{tag}"))

    # several at once, one by a short id
    r = ctops(c, "exceptions", "ack", a[:8], b, role="operator")
    assert r.returncode == OK, r.stderr
    assert [line.split()[:2] for line in r.stdout.splitlines()] == [[a, "acknowledged"], [b, "acknowledged"]]
    assert group(c, a)["status"] == group(c, b)["status"] == "acknowledged"

    # an unknown id is reported and the others still done: exit 1
    r = ctops(c, "exceptions", "resolve", "f0f0f0f0f0", a[:6], role="operator")
    assert r.returncode == FAILED, r.stderr
    assert "f0f0f0f0f0: unknown exception group 'f0f0f0f0f0'" in r.stderr and "Traceback" not in r.stderr
    assert group(c, a)["status"] == "resolved"

    r = ctops(c, "exceptions", "mute", d[:7], b[:10], "--minutes", "5", role="operator")
    assert r.returncode == OK, r.stderr
    assert group(c, d)["status"] == group(c, b)["status"] == "muted"

    # show by a short id; the audit names the full id each action was done to
    r = ctops(c, "exceptions", "show", d[:6])
    assert r.returncode == OK and r.stdout.startswith(f"{d}  D{tag}: D{tag} happened"), r.stdout + r.stderr
    audit = httpx.get(f"{c.ops_url()}/api/v1/audit", params={"limit": 50}, headers=c.auth("viewer"),
                      timeout=10).json()
    targets = {(e["action"], e["target"]) for e in audit}
    assert {("exception_acknowledge", f"exception-group/{a}"), ("exception_resolve", f"exception-group/{a}"),
            ("exception_mute", f"exception-group/{d}")} <= targets
    assert ("resolve", "exception-group/f0f0f0f0f0") in targets  # refused actions are audited too

    # a prefix of two groups: refused, naming both, nothing changed
    x, y = ingest(c, *(exc_event(t) for t in colliding_types(tag)))
    assert x[:6] == y[:6] and x != y
    r = ctops(c, "exceptions", "ack", x[:6], role="operator")
    assert r.returncode == FAILED
    assert f"is ambiguous: 2 groups start with it; give more digits: {min(x, y)}, {max(x, y)}" in r.stderr
    assert group(c, x)["status"] == group(c, y)["status"] == "unresolved"
    r = ctops(c, "exceptions", "show", x[:6])
    assert r.returncode == FAILED and min(x, y) in r.stderr and max(x, y) in r.stderr
    # too short to be an id prefix: unknown, not a scan of every group
    assert ctops(c, "exceptions", "show", x[:5]).returncode == FAILED


def test_a_refused_token_is_named_with_how_to_pass_one(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    r = ctops(c, "exceptions", "list", token="not-a-token")
    assert r.returncode == AUTH
    assert "the token given with --token was refused (invalid token)" in r.stderr
    assert "--token" in r.stderr and "CTOPS_TOKEN" in r.stderr and "Traceback" not in r.stderr

    r = ctops(c, "exceptions", "tail", token="", env={"CTOPS_TOKEN": "also-not-a-token"})
    assert r.returncode == AUTH and "the token in $CTOPS_TOKEN was refused" in r.stderr

    # a good token whose role may not: which role it needs
    r = ctops(c, "exceptions", "ack", "0123456789abcdef", role="viewer")
    assert r.returncode == AUTH
    assert "may not do this (role 'viewer' may not do this); it needs a token with the operator role" in r.stderr
    assert "{" not in r.stderr

    # the check stays in the plugin range: a refused token says nothing about the cluster
    r = ctops(c, "status", token="not-a-token")
    assert r.returncode == UNKNOWN and "the token given with --token was refused" in r.stderr


# every subcommand that writes to stdout, its reader gone before the first byte (`| head` that has
# read enough): no traceback, and the exit code is the command's (the check's verdict too)
CLOSED_PIPE = [("status",), ("status", "--json"), ("exceptions", "list"), ("exceptions", "list", "--json"),
               ("exceptions", "tail"), ("exceptions", "tail", "--json")]


def test_a_reader_that_leaves_early_gets_no_traceback(running_dispatcher: Cluster) -> None:
    c = running_dispatcher
    tag = uuid.uuid4().hex[:8]
    post_events(c, *(exc_event(f"P{tag}", func=f"f{i}") for i in range(30)))
    check = ctops(c, "status")
    assert "Traceback" not in check.stderr
    for argv in CLOSED_PIPE:
        expected = check.returncode if argv[0] == "status" else OK
        args = [*argv, "--url", c.ops_url(), "--token", c.viewer_token]
        r, w = os.pipe()
        os.close(r)  # the reader left
        try:
            p = subprocess.run(ctops_argv(*args), stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(w)
        assert p.returncode == expected, (argv, p.returncode, p.stderr, verdict(check))
        assert p.stderr == "", (argv, p.stderr)

    # and through a shell pipe, as the issue saw it
    sh = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -n 2 >/dev/null; echo "${PIPESTATUS[0]}"', "-",
                         *ctops_argv("exceptions", "tail", "--limit", "30", "--url", c.ops_url(), "--token",
                                     c.viewer_token)],
                        capture_output=True, text=True, timeout=120)
    assert sh.stdout.strip() == "0" and "Traceback" not in sh.stderr and "BrokenPipe" not in sh.stderr, sh.stderr


async def test_a_one_shot_command_asks_every_dispatcher_at_once() -> None:
    """Both dispatchers frozen (they accept, never answer): a command's first read waits for both at
    the same time, so it knows there is no answer after one timeout, not one per dispatcher."""
    asked: list[int] = []
    thaw = asyncio.Event()

    def frozen(i: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            asked.append(i)
            await thaw.wait()
            writer.close()
        return accept

    servers = [await asyncio.start_server(frozen(i), "127.0.0.1", 0) for i in range(2)]
    urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    client = OpsClient(urls, "t", timeout=600, race_first=True)
    read = asyncio.create_task(client.state())
    try:
        for _ in range(600):
            if len(asked) == 2 or read.done():
                break
            await asyncio.sleep(0.05)
        assert sorted(asked) == [0, 1] and not read.done()
    finally:
        read.cancel()
        await client.aclose()
        for s in servers:
            s.close()

    # one frozen, one refusing: the answer names both, in the order given
    refused_port = servers[1].sockets[0].getsockname()[1] if servers[1].sockets else 1
    late = await asyncio.start_server(frozen(2), "127.0.0.1", 0)
    client = OpsClient([f"http://127.0.0.1:{late.sockets[0].getsockname()[1]}", f"http://127.0.0.1:{refused_port}"],
                       "t", timeout=0.5, race_first=True)
    try:
        with pytest.raises(Unreachable) as gone:
            await client.state()
        (url1, why1), (url2, why2) = gone.value.tried
        assert why1 == "timed out" and why2.startswith(("connection refused", "cannot connect"))
    finally:
        await client.aclose()
        thaw.set()
        late.close()
        await late.wait_closed()


def test_usage_and_store_errors_have_their_codes(tmp_path: Path) -> None:
    """No state file is a usage error (2); a store that does not answer is 3, like a dispatcher
    that does not: one line each, no traceback."""
    no_state = subprocess.run(ctops_argv("store", "verify", "--state-file", str(tmp_path / "none.json")),
                              capture_output=True, text=True, timeout=120)
    assert no_state.returncode == USAGE and "no state file" in no_state.stderr and "Traceback" not in no_state.stderr
    dead = free_port()
    (tmp_path / "d.toml").write_text(f"""
cluster = "t"
[redis]
url = "redis://127.0.0.1:{dead}/0"
[[dispatchers]]
name = "A"
data = "127.0.0.1:{free_port()}"
ops = "127.0.0.1:{free_port()}"
[[servers]]
name = "trainer-1"
url = "http://127.0.0.1:{free_port()}"
""")
    r = subprocess.run(ctops_argv("store", "verify", "--config", str(tmp_path / "d.toml")), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == UNREACHABLE and "the store (Redis) did not answer" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

"""`ctops demo --headless` as a new user runs it: state file, `ctops status --json`, `ctops chaos`,
and SIGTERM leaves no process behind."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from ctops import statefile
from ctops_tools.procs import pid_alive
from ctops_tools.status import leader_state
from tests.cluster import wait_for


def ctops(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctops_tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_headless_demo_status_chaos_and_clean_stop(tmp_path: Path) -> None:
    state_file = tmp_path / "demo.json"
    log = open(tmp_path / "demo.log", "wb")
    demo = subprocess.Popen([sys.executable, "-m", "ctops_tools.cli", "demo", "--headless",
                             "--state-file", str(state_file),
                             "--workdir", str(tmp_path / "work")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for("state file", lambda: state_file.exists(), timeout=120, every=0.3)
        doc = json.loads(state_file.read_text())
        assert [d["name"] for d in doc["dispatchers"]] == ["A", "B"]
        assert all(d["data_url"].startswith("http://") and d["ops_url"] and d["pid"] for d in doc["dispatchers"])
        assert [t["name"] for t in doc["trainers"]] == ["trainer-1", "trainer-2", "trainer-3"]
        assert all(t["url"] and t["pid"] for t in doc["trainers"])
        assert len(doc["agents"]) == 3 and len(doc["llm_providers"]) == 2
        assert doc["redis"]["url"].startswith("redis://") and doc["redis"]["pid"]
        assert {"operator", "viewer", "agent", "agents", "peer", "scrape", "llm"} <= set(doc["tokens"])
        # one token per host; `agent` is host-1's, for scripts written before that
        assert set(doc["tokens"]["agents"]) == {"host-1", "host-2", "host-3"}
        assert doc["tokens"]["agent"] == doc["tokens"]["agents"]["host-1"]
        assert len(set(doc["tokens"]["agents"].values())) == 3
        assert state_file.stat().st_mode & 0o777 == 0o600
        assert Path(doc["config"]).stat().st_mode & 0o777 == 0o600
        # the duplicated store, all of it in the state file; files with secrets are the owner's only
        nodes = {n["name"]: n for n in doc["redis"]["nodes"]}
        assert {n: v["role"] for n, v in nodes.items()} == {
            "redis-1": "primary", "redis-2": "replica", "redis-3": "replica",
            "sentinel-1": "sentinel", "sentinel-2": "sentinel", "sentinel-3": "sentinel"}
        assert all(pid_alive(n["pid"]) and n["url"].startswith("redis://") for n in nodes.values())
        for f in (state_file, Path(doc["config"]), *Path(doc["workdir"], "redis").glob("*/*.conf"),
                  *Path(doc["workdir"], "redis").glob("*/users.acl")):
            assert f.stat().st_mode & 0o077 == 0, f

        out = ctops("status", "--json", "--state-file", str(state_file))
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
        assert st["leader"] in ("A", "B")
        assert {s["name"]: s["state"] for s in st["servers"]} == {f"trainer-{i}": "up" for i in (1, 2, 3)}
        assert all(s["active_sessions"] >= 0 for s in st["servers"])
        assert {d["name"] for d in st["dispatchers"]} == {"A", "B"}
        assert all(h["state"] == "alive" and h["heartbeat_age_ms"] is not None for h in st["hosts"])

        # what the README hands a newcomer: the `openai` client against the LLM pool on a data port, with
        # the key from the state file (a wrong key is refused), and `curl /metrics` with the scrape token
        llm_url = doc["dispatchers"][1]["data_url"] + "/llm/v1"
        answer = openai.OpenAI(base_url=llm_url, api_key=doc["tokens"]["llm"], max_retries=0).chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "Review: print('hi')"}])
        assert answer.choices[0].message.content
        refused = httpx.post(llm_url + "/chat/completions", headers={"Authorization": "Bearer wrong"},
                             json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert refused.status_code == 401
        metrics = httpx.get(doc["dispatchers"][0]["ops_url"] + "/metrics",
                            headers={"Authorization": f"Bearer {doc['tokens']['scrape']}"}, timeout=30)
        assert metrics.status_code == 200 and 'ctops_server_status{server="trainer-1",state="up"} 1.0' in metrics.text

        out = ctops("chaos", "freeze", "trainer-2", "--state-file", str(state_file))
        assert out.returncode == 0, out.stderr
        frozen = doc["trainers"][1]["pid"]

        def trainer2() -> str:
            # what `ctops status` reads (its code, in this process): an interpreter started for each
            # poll would starve the cluster it waits for
            st = asyncio.run(leader_state(statefile.ops_urls(doc), statefile.token(doc, "viewer")))
            return next(s.state for s in st.servers if s.name == "trainer-2")

        # the agent's liveness probe finds it hung and kills it; its warm spare takes over the port
        # (often before the dispatcher's checks see it down), and trainer-2 is up
        wait_for("frozen process killed", lambda: not pid_alive(frozen))
        wait_for("trainer-2 replaced and up", lambda: trainer2() == "up")
        out = ctops("chaos", "thaw", "trainer-2", "--state-file", str(state_file))
        assert out.returncode == 0 or "is not running" in out.stderr, out.stderr
        assert ctops("chaos", "kill", "nobody", "--state-file", str(state_file)).returncode == 2

        # the primary dies: a replica takes over, learners keep being served, and the next
        # `kill redis-primary` hits the new primary, not the dead one
        out = ctops("chaos", "kill", "redis-primary", "--state-file", str(state_file))
        assert out.returncode == 0 and "redis-1" in out.stdout, out.stdout + out.stderr
        data = doc["dispatchers"][0]["data_url"]
        r = httpx.post(data + "/api/sessions", json={"learner": "ada"}, timeout=30)
        assert r.status_code == 201, r.text
        # each try starts an interpreter: once a second, not ten times
        wait_for("a replica promoted", lambda: (o := ctops("chaos", "freeze", "redis-primary", "--state-file",
                                                              str(state_file))).returncode == 0 and o.stdout,
                 every=1.0)
        frozen_primary = ctops("chaos", "thaw", "redis-primary", "--state-file", str(state_file))
        assert frozen_primary.returncode == 0
        assert not pid_alive(nodes["redis-1"]["pid"])

        pids = [d["pid"] for d in doc["dispatchers"]] + [a["pid"] for a in doc["agents"]]
        pids += [p["pid"] for p in doc["llm_providers"]] + [doc["redis"]["pid"], frozen]
        pids += [t["pid"] for t in doc["trainers"]] + [n["pid"] for n in nodes.values()]
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(60)
        log.close()
    assert code == 0, (tmp_path / "demo.log").read_text()
    assert [p for p in pids if pid_alive(p)] == []
    assert not state_file.exists()


def test_demo_started_again_on_its_workdir_keeps_tokens_ports_and_state(tmp_path: Path) -> None:
    state_file, work = tmp_path / "demo.json", tmp_path / "work"

    def run_demo(n: int) -> tuple[subprocess.Popen[bytes], dict]:
        log = open(tmp_path / f"demo{n}.log", "wb")
        demo = subprocess.Popen([sys.executable, "-m", "ctops_tools.cli", "demo", "--headless", "--state-file",
                                 str(state_file), "--workdir", str(work)], stdout=log, stderr=subprocess.STDOUT)
        wait_for("state file", lambda: state_file.exists() or demo.poll() is not None, timeout=120, every=0.3)
        assert demo.poll() is None, (tmp_path / f"demo{n}.log").read_text()
        return demo, json.loads(state_file.read_text())

    demo, first = run_demo(1)
    try:
        r = httpx.post(first["dispatchers"][0]["data_url"] + "/api/sessions", json={"learner": "ada"}, timeout=30)
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0
    demo, second = run_demo(2)
    try:
        assert second["tokens"] == first["tokens"]
        assert [(d["data_url"], d["ops_url"]) for d in second["dispatchers"]] == \
            [(d["data_url"], d["ops_url"]) for d in first["dispatchers"]]
        assert [n["url"] for n in second["redis"]["nodes"]] == [n["url"] for n in first["redis"]["nodes"]]
        # the learner's session outlived the restart (AOF)
        r = httpx.get(f"{second['dispatchers'][0]['data_url']}/api/sessions/{sid}", timeout=30)
        assert r.status_code == 200, r.text
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0

"""Two real `ctops trainer` processes sharing a real Redis, with a real `ctops fake-llm` as provider."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ctops.keys import Keys
from ctops_tools.procs import ctops_argv
from ctops_tools.redis_embed import EmbeddedRedis, free_port
from tests.common import FIZZBUZZ_GOOD as GOOD
from tests.common import wait_http
from trainer.fake_llm import CONTROL_TOKEN_ENV, control_headers, control_token

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-value-for-ctops-trainer-test"
WRONG = "def fizzbuzz(n):\n    return str(n)\n"


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


class Cluster:
    def __init__(self, prefix: str, redis_url: str, fake: str, t1: str, t2: str) -> None:
        self.prefix, self.redis_url, self.fake, self.t1, self.t2 = prefix, redis_url, fake, t1, t2
        self.keys = Keys(prefix=prefix)


@pytest.fixture(scope="module")
def cluster(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("trainer")
    prefix = f"t{os.getpid()}:trainer:{uuid.uuid4().hex[:8]}"
    pf, p1, p2 = free_port(), free_port(), free_port()
    config = tmp / "deploy.toml"
    config.write_text(f"""
cluster = "test"
[redis]
url = "{redis_server.url}"
prefix = "{prefix}"
[sandbox]
cpu_seconds = 1
memory_mb = 128
max_processes = 16
wall_seconds = 4
[trainer]
provider_cooldown_ms = 0
review_retry_initial_ms = 200
review_retry_max_ms = 1000
[[dispatchers]]
name = "A"
data = "127.0.0.1:{free_port()}"
ops = "127.0.0.1:{free_port()}"
[[servers]]
name = "trainer-1"
url = "http://127.0.0.1:{p1}"
[[servers]]
name = "trainer-2"
url = "http://127.0.0.1:{p2}"
[[llm_providers]]
name = "fake-a"
base_url = "http://127.0.0.1:{pf}/v1"
api_key_env = "CTOPS_TEST_LLM_KEY"
timeout_ms = 5000
""")
    env = {**os.environ, "CTOPS_SECRET_FOR_TEST": SECRET, "CTOPS_TEST_LLM_KEY": "test-key"}
    procs = [
        subprocess.Popen([*ctops_argv(), "fake-llm", "--port", str(pf), "--name", "fake-a"], cwd=ROOT,
                         env={**os.environ, CONTROL_TOKEN_ENV: control_token()}),
        subprocess.Popen([*ctops_argv(), "trainer", "--config", str(config), "--name", "trainer-1"], cwd=ROOT,
                         env=env),
        subprocess.Popen([*ctops_argv(), "trainer", "--config", str(config), "--name", "trainer-2"], cwd=ROOT,
                         env=env),
    ]
    urls = [f"http://127.0.0.1:{p}" for p in (pf, p1, p2)]
    try:
        wait_http(urls[0] + "/_fake/mode", procs[0])
        wait_http(urls[1] + "/healthz", procs[1])
        wait_http(urls[2] + "/healthz", procs[2])
        yield Cluster(prefix, redis_server.url, *urls)
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0, 0], "every process should exit cleanly on SIGTERM"


@pytest.fixture
def c(cluster: Cluster) -> Iterator[Cluster]:
    httpx.post(cluster.fake + "/_fake/mode", json={"mode": "ok"}, headers=control_headers())
    yield cluster
    httpx.post(cluster.fake + "/_fake/mode", json={"mode": "ok"}, headers=control_headers())


def new_session(base: str, learner: str = "ada") -> str:
    r = httpx.post(base + "/api/sessions", json={"learner": learner})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def post_submission(base: str, sid: str, code: str, exercise: str = "fizzbuzz") -> httpx.Response:
    return httpx.post(f"{base}/api/sessions/{sid}/submissions", json={"exercise_id": exercise, "code": code},
                      timeout=60)


def poll(base: str, sid: str, sub_id: str, until: str = "done", timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{base}/api/sessions/{sid}/submissions/{sub_id}", timeout=10)
        assert r.status_code == 200, r.text
        if r.json()["status"] == until or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.1)


def submit(base: str, sid: str, code: str, exercise: str = "fizzbuzz") -> dict:
    """What a learner's browser does: POST, then poll until done."""
    r = post_submission(base, sid, code, exercise)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "received" and r.headers["location"].endswith(accepted["submission_id"])
    return poll(base, sid, accepted["submission_id"])


def test_healthz_and_readyz(c: Cluster) -> None:
    r = httpx.get(c.t1 + "/healthz")
    assert r.status_code == 200
    live = r.json()
    assert live["status"] == "ok" and live["server"] == "trainer-1" and "active_sessions" not in live
    # what confines learner code on this server, as probed at its start
    assert live["sandbox"]["network"] in ("namespace", "seccomp") and live["sandbox"]["runs_code"] is True
    assert live["sandbox"]["budget"] in ("cgroup2", "cgroup1", "rlimit")
    body = httpx.get(c.t1 + "/readyz").json()
    assert body["status"] == "ok" and body["store"] == "ok" and body["server"] == "trainer-1"
    assert isinstance(body["active_sessions"], int)


def test_a_forged_report_through_a_trainer_is_not_a_pass(c: Cluster) -> None:
    forged = ("import os\nline = b'\\x1ectops {\"event\": \"test\", \"name\": \"one\", \"passed\": true}\\n'\n"
              "for fd in range(1, 64):\n    try:\n        os.write(fd, line)\n    except OSError:\n        pass\n"
              "def fizzbuzz(n):\n    return None\n")
    done = submit(c.t1, new_session(c.t1), forged)
    assert done["verdict"] == "failed", done
    assert not any(t["passed"] for t in done["tests"])


def test_exercises(c: Cluster) -> None:
    listed = httpx.get(c.t1 + "/api/exercises").json()["exercises"]
    assert {"fizzbuzz", "reverse_words", "is_prime", "fibonacci", "anagram"} <= {e["id"] for e in listed}
    one = httpx.get(c.t1 + "/api/exercises/is_prime").json()
    assert one["statement"] and one["starter"] and len(one["tests"]) >= 3
    r = httpx.get(c.t1 + "/api/exercises/nope")
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_create_session_sets_cookie(c: Cluster) -> None:
    r = httpx.post(c.t1 + "/api/sessions", json={"learner": "grace"})
    assert r.status_code == 201
    sid = r.json()["session_id"]
    cookie = r.headers["set-cookie"]
    assert f"ctops_session={sid}" in cookie and "HttpOnly" in cookie and "Path=/" in cookie
    # no body at all is fine too
    r = httpx.post(c.t1 + "/api/sessions")
    assert r.status_code == 201 and r.json()["session_id"] != sid
    got = httpx.get(f"{c.t1}/api/sessions/{sid}").json()
    assert got["learner"] == "grace" and got["submissions"] == []


def test_correct_and_wrong_solutions_get_results_and_a_review(c: Cluster) -> None:
    sid = new_session(c.t1)
    ok = submit(c.t1, sid, GOOD)
    assert ok["status"] == "done" and ok["verdict"] == "passed"
    assert ok["server"] == "trainer-1" and ok["session_id"] == sid
    assert all(t["passed"] for t in ok["tests"]) and len(ok["tests"]) == 5
    assert ok["review"]["status"] == "done" and ok["review"]["provider"] == "fake-a"
    assert "fake-a" in ok["review"]["text"] and "passed" in ok["review"]["text"]

    assert [s["step"] for s in ok["steps"]] == ["received", "tested", "review_requested", "review_received", "done"]
    bad = submit(c.t1, sid, WRONG)
    assert bad["verdict"] == "failed"
    failing = [t for t in bad["tests"] if not t["passed"]]
    assert {t["name"] for t in failing} == {"three", "five", "fifteen"}
    assert all(t["message"] for t in failing)
    assert bad["review"]["status"] == "done" and "failed" in bad["review"]["text"]

    stored = httpx.get(f"{c.t1}/api/sessions/{sid}/submissions/{bad['submission_id']}").json()
    assert stored["verdict"] == "failed" and stored["tests"] == bad["tests"] and stored["status"] == "done"
    session = httpx.get(f"{c.t1}/api/sessions/{sid}").json()
    assert [s["submission_id"] for s in session["submissions"]] == [ok["submission_id"], bad["submission_id"]]


def test_llm_failure_leaves_the_review_pending_then_fills_it(c: Cluster) -> None:
    httpx.post(c.fake + "/_fake/mode", json={"mode": "500"}, headers=control_headers())
    sid = new_session(c.t1)
    body = submit(c.t1, sid, GOOD)
    assert body["status"] == "done" and body["verdict"] == "passed"
    assert body["review"]["status"] == "pending" and "delayed" in body["review"]["message"]
    httpx.post(c.fake + "/_fake/mode", json={"mode": "ok"}, headers=control_headers())
    filled = poll(c.t2, sid, body["submission_id"], timeout=30)
    deadline = time.monotonic() + 30
    while filled["review"]["status"] != "done" and time.monotonic() < deadline:
        time.sleep(0.2)
        filled = poll(c.t2, sid, body["submission_id"])
    assert filled["review"]["status"] == "done" and "fake-a" in filled["review"]["text"]
    assert filled["tests"] == body["tests"]


def test_session_is_served_by_another_trainer(c: Cluster) -> None:
    sid = new_session(c.t1, "linus")
    first = submit(c.t1, sid, GOOD)
    other = httpx.get(f"{c.t2}/api/sessions/{sid}")
    assert other.status_code == 200
    assert other.json()["learner"] == "linus" and other.json()["server"] == "trainer-2"
    assert other.json()["last_server"] == "trainer-2"
    assert [s["submission_id"] for s in other.json()["submissions"]] == [first["submission_id"]]
    second = submit(c.t2, sid, WRONG)
    # a client that prefers one call can wait for the result (bounded), on any server
    waited = httpx.post(f"{c.t2}/api/sessions/{sid}/submissions?wait=30", json={"exercise_id": "fizzbuzz",
                        "code": GOOD}, timeout=60)
    assert waited.status_code == 200 and waited.json()["status"] == "done" and waited.json()["verdict"] == "passed"
    assert second["server"] == "trainer-2" and second["verdict"] == "failed"
    assert httpx.get(f"{c.t1}/api/sessions/{sid}/submissions/{second['submission_id']}").status_code == 200
    # readiness reports the sessions as its background probe of the store last counted them
    deadline = time.monotonic() + 10
    while httpx.get(c.t2 + "/readyz").json()["active_sessions"] < 1:
        assert time.monotonic() < deadline, "readyz never counted the active session"
        time.sleep(0.1)


def test_bad_requests_are_4xx_and_store_nothing(c: Cluster) -> None:
    sid = new_session(c.t1)
    url = f"{c.t1}/api/sessions/{sid}/submissions"
    cases = [
        httpx.post(url, content=b"this is not json", headers={"content-type": "application/json"}),
        httpx.post(url, json={"exercise_id": "fizzbuzz", "code": 123}),
        httpx.post(url, json={"exercise_id": ["fizzbuzz"], "code": GOOD}),
        httpx.post(url, json={"code": GOOD}),
        httpx.post(url, json=["fizzbuzz", GOOD]),
        httpx.post(url, json={"exercise_id": "fizzbuzz", "code": "x = 1\n" * 20000}),
        httpx.post(url, json={"exercise_id": "fizzbuzz", "code": "#" * 300_000}),
    ]
    assert [r.status_code for r in cases] == [422, 422, 422, 422, 422, 413, 413]
    for r in cases:
        assert r.headers["content-type"].startswith("application/json")
    unknown = post_submission(c.t1, sid, GOOD, exercise="no_such_exercise")
    assert unknown.status_code == 404 and "no_such_exercise" in unknown.json()["detail"]
    assert post_submission(c.t1, "s_nope", GOOD).status_code == 404
    assert httpx.post(c.t1 + "/api/sessions", json={"learner": 5}).status_code == 422
    assert httpx.get(f"{c.t1}/api/sessions/s_nope").status_code == 404
    assert httpx.get(f"{c.t1}/api/sessions/{sid}").json()["submissions"] == []
    with redis.Redis.from_url(c.redis_url) as r:
        assert r.llen(c.keys.session_submissions(sid)) == 0
        assert r.exists(c.keys.session("s_nope")) == 0


def test_healthz_answers_while_an_endless_loop_runs(c: Cluster) -> None:
    sid = new_session(c.t1)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(
        submit(c.t1, sid, "def fizzbuzz(n):\n    while True:\n        pass\n")))
    worker.start()

    def running() -> bool:
        subs = httpx.get(f"{c.t1}/api/sessions/{sid}").json()["submissions"]
        return bool(subs) and subs[0]["status"] == "running"

    answered_while_running = 0
    while worker.is_alive():
        if running():
            r = httpx.get(c.t1 + "/healthz", timeout=10)
            assert r.status_code == 200
            answered_while_running += running()
        time.sleep(0.02)
    worker.join()
    assert result["verdict"] == "timeout"
    assert answered_while_running >= 1


def test_learner_code_cannot_read_the_servers_environment(c: Cluster) -> None:
    sid = new_session(c.t1)
    code = f"""
import os
def fizzbuzz(n):
    seen = repr(dict(os.environ))
    for pid in (os.getppid(), os.getpid(), 1):
        try:
            seen += open(f"/proc/{{pid}}/environ", errors="replace").read()
        except OSError:
            pass
    return "LEAKED" if {SECRET!r} in seen or "CTOPS_SECRET_FOR_TEST" in seen else str(n)
"""
    body = submit(c.t1, sid, code)
    assert all("LEAKED" not in t["message"] and SECRET not in t["message"] for t in body["tests"])
    assert body["tests"][0]["passed"]


def test_store_loss_is_a_json_503_with_retry_after_and_only_readiness_reports_it() -> None:
    import redis.asyncio as aioredis
    from fastapi.testclient import TestClient

    from ctops.config import parse
    from trainer.app import create_app

    dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    deployment = parse({"dispatchers": [{"name": "A", "data": "127.0.0.1:1", "ops": "127.0.0.1:2"}],
                        "servers": [{"name": "t", "url": "http://127.0.0.1:3"}]})
    with TestClient(create_app(deployment, "t", dead), raise_server_exceptions=False) as client:
        r = client.get("/api/sessions/s_x")
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
        assert r.headers["retry-after"] == "2" and "shared state" in r.json()["detail"]
        # liveness is the process alone: an agent must not restart a server because the store is away
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "store-unavailable"
        assert client.get("/api/exercises").status_code == 200  # what needs no store is still served


def test_unexpected_store_answers_are_json_500(redis_server: EmbeddedRedis) -> None:
    import redis.asyncio as aioredis
    from fastapi.testclient import TestClient

    from ctops.config import parse
    from trainer.app import create_app

    prefix = f"t{uuid.uuid4().hex[:8]}"
    deployment = parse({"dispatchers": [{"name": "A", "data": "127.0.0.1:1", "ops": "127.0.0.1:2"}],
                        "servers": [{"name": "t", "url": "http://127.0.0.1:3"}], "redis": {"prefix": prefix}})
    redis.Redis.from_url(redis_server.url).set(Keys(prefix).session("s_odd"), "not a hash")
    client_redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    with TestClient(create_app(deployment, "t", client_redis), raise_server_exceptions=False) as client:
        r = client.get("/api/sessions/s_odd")  # WRONGTYPE: bad data, not an outage
        # a damaged record (ctops/integrity.py): set aside, and a clear answer to this learner alone
        assert r.status_code == 410 and r.headers["content-type"].startswith("application/json")
        assert r.json()["error"] == "session_damaged"
        assert client.get("/readyz").status_code == 200


def test_unknown_server_name_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "d.toml"
    config.write_text('[[dispatchers]]\nname = "A"\ndata = "127.0.0.1:1"\nops = "127.0.0.1:2"\n')
    r = subprocess.run([*ctops_argv(), "trainer", "--config", str(config), "--name", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no server named 'nope'" in r.stderr


def test_review_endpoints_direct_by_priority_or_the_dispatchers_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctops.config import parse
    from trainer.review import endpoints

    monkeypatch.setenv("CTOPS_TEST_POOL_KEY", "pool-key")
    base = {"dispatchers": [{"name": "A", "data": "127.0.0.1:81", "ops": "127.0.0.1:82"},
                            {"name": "B", "data": "127.0.0.1:91", "ops": "127.0.0.1:92"}],
            "llm_providers": [{"name": "second", "base_url": "http://s/v1/", "priority": 2},
                              {"name": "first", "base_url": "http://f/v1", "priority": 1, "model": "m1"}],
            "llm": {"models": ["gpt-4o"], "client_key_env": "CTOPS_TEST_POOL_KEY"}}
    direct = endpoints(parse(base))
    assert [(e.name, e.base_url, e.model) for e in direct] == [("first", "http://f/v1", "m1"),
                                                               ("second", "http://s/v1", "gpt-4")]
    pool = endpoints(parse({**base, "trainer": {"llm": "dispatcher"}}))
    assert [(e.name, e.base_url, e.model, e.api_key) for e in pool] == [
        ("pool@A", "http://127.0.0.1:81/llm/v1", "gpt-4o", "pool-key"),
        ("pool@B", "http://127.0.0.1:91/llm/v1", "gpt-4o", "pool-key")]

"""The fork server the test clusters start their processes with (ctops_tools/forkserver.py): a child
is a process of its own (own session, its log, the environment it is given), runs `ctops ...` as the
command line would, and answers poll / wait / signals like a `Popen` child, exit codes included."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ctops_tools.forkserver import ForkServer
from ctops_tools.procs import ctops_argv, pid_alive
from ctops_tools.redis_embed import free_port
from tests.cluster import wait_for
from trainer.fake_llm import CONTROL_TOKEN_ENV


@pytest.fixture
def server() -> Iterator[ForkServer]:
    s = ForkServer()
    yield s
    s.close()


def test_a_forked_fake_serves_stops_on_sigterm_and_reports_its_exit(server: ForkServer, tmp_path: Path) -> None:
    port = free_port()
    child = server.spawn("fake", ctops_argv("fake-llm", "--port", str(port), "--name", "forked"),
                         str(tmp_path / "f.log"), {CONTROL_TOKEN_ENV: "token-given-to-this-child"})
    assert child.pid != os.getpid() and child.proc.poll() is None
    wait_for("the fake answering", lambda: httpx.get(f"http://127.0.0.1:{port}/_fake/mode", timeout=2).is_success)
    assert os.getsid(child.pid) == child.pid  # a session of its own, as spawn() gives
    # the environment it was given is the one it runs with: its control token is that one
    # (/proc/<pid>/environ would not say: it shows the fork server's, the environment at exec)
    url = f"http://127.0.0.1:{port}/_fake/mode"
    assert httpx.post(url, json={"mode": "ok"}, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    r = httpx.post(url, json={"mode": "ok"}, headers={"Authorization": "Bearer token-given-to-this-child"}, timeout=5)
    assert r.status_code == 200, r.text
    with pytest.raises(subprocess.TimeoutExpired):
        child.proc.wait(0.2)
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(30) == 0  # uvicorn's clean stop on SIGTERM
    assert child.proc.poll() == 0 and not pid_alive(child.pid)


def test_a_forked_command_that_fails_exits_with_its_code_and_says_why_in_its_log(server: ForkServer,
                                                                                  tmp_path: Path) -> None:
    log = tmp_path / "trainer.log"
    child = server.spawn("trainer", ctops_argv("trainer", "--config", str(tmp_path / "missing.toml"),
                                               "--name", "trainer-1"), str(log), {})
    assert child.proc.wait(30) == 2  # the exit code `ctops trainer` gives a configuration error
    assert "missing.toml" in log.read_text()


def test_a_killed_child_reports_the_signal(server: ForkServer, tmp_path: Path) -> None:
    port = free_port()
    child = server.spawn("fake", ctops_argv("fake-llm", "--port", str(port)), str(tmp_path / "f.log"), {})
    wait_for("the fake answering", lambda: httpx.get(f"http://127.0.0.1:{port}/_fake/mode", timeout=2).is_success)
    child.proc.kill()
    assert child.proc.wait(30) == -signal.SIGKILL

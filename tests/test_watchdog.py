"""The agent's watchdog with real processes and real signals: crashes are restarted, hung processes
are replaced, crash loops end in `fatal` with one notification, and the two watchdog threads
replace each other when one stalls."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from agents.supervisor import Supervisor
from ctops.config import LivenessSpec, ProcessSpec
from ctops.wire import AgentEvent
from ctops_tools.bench.hammer import Hammer, get
from ctops_tools.procs import pid_alive
from ctops_tools.redis_embed import free_port
from tests.cluster import wait_for


def http_program(port: int, **kw) -> ProcessSpec:
    return ProcessSpec(name="web", command=[sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                       liveness=LivenessSpec(kind="http", url=f"http://127.0.0.1:{port}/", interval_ms=200,
                                             timeout_ms=300, failures=2), **kw)


@pytest.fixture
def events() -> list[AgentEvent]:
    return []


@pytest.fixture
def make_sup(events: list[AgentEvent]) -> Iterator:
    made: list[Supervisor] = []

    def make(*specs: ProcessSpec) -> Supervisor:
        s = Supervisor(list(specs), on_event=events.append)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def proc(sup: Supervisor, name: str = "web") -> dict:
    return next(p for p in sup.snapshot()[0] if p["name"] == name)


def answering(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def test_crash_is_restarted_counted_and_reported(make_sup, events) -> None:
    port = free_port()
    sup = make_sup(http_program(port))
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    os.kill(p["pid"], signal.SIGKILL)
    q = wait_for("restarted", lambda: (q := proc(sup))["pid"] not in (None, p["pid"]) and q["state"] == "running" and q)
    assert q["restarts"] == 1 and "SIGKILL" in q["last_exit"]
    wait_for("answering again", lambda: answering(port))
    assert [e.kind for e in events] == ["process_restarted"] and events[0].process == "web"


def test_hung_process_is_killed_and_replaced(make_sup, events) -> None:
    port = free_port()
    sup = make_sup(http_program(port))
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    os.kill(p["pid"], signal.SIGSTOP)
    q = wait_for("replaced", lambda: (q := proc(sup))["pid"] not in (None, p["pid"]) and q)
    assert "hung" in q["last_exit"]
    wait_for("old one gone", lambda: not pid_alive(p["pid"]))
    wait_for("answering again", lambda: answering(port))


def test_crash_loop_backs_off_then_fatal_with_one_notification(make_sup, events) -> None:
    spec = ProcessSpec(name="bad", command=[sys.executable, "-c", "import sys; sys.exit(3)"],
                       backoff_initial_ms=50, backoff_max_ms=400, crashloop_restarts=4, crashloop_window_ms=60_000)
    sup = make_sup(spec)
    wait_for("fatal", lambda: proc(sup, "bad")["state"] == "fatal")
    p = proc(sup, "bad")
    assert p["restarts"] == 4 and "status 3" in p["last_exit"]
    restarts = [e for e in events if e.kind == "process_restarted"]
    delays = [int(e.message.rsplit(" in ", 1)[1].split()[0]) for e in restarts]
    assert delays == sorted(delays) and delays[-1] > delays[0]  # backoff grows
    time.sleep(1.0)
    assert [e.kind for e in events].count("crash_loop") == 1
    assert proc(sup, "bad")["state"] == "fatal" and proc(sup, "bad")["restarts"] == 4  # no more restarts


class FirstCheckerHangs(Supervisor):
    """Once `hang` is set, the first checker thread stops beating, as if stuck in a call that never
    returns (the supervisor has no such call on purpose); what the guard does about it is under test."""

    def __init__(self, *args, **kw) -> None:  # noqa: ANN002,ANN003 - Supervisor's
        super().__init__(*args, **kw)
        self.hang = threading.Event()

    def _sync_selector(self, *args) -> None:  # noqa: ANN002 - Supervisor's
        if self.hang.is_set() and threading.current_thread().name == "watchdog-checker-1":
            while self.generation == 1 and self.running:
                time.sleep(0.05)
        super()._sync_selector(*args)


def test_frozen_checker_is_replaced_and_supervision_goes_on(events) -> None:
    port = free_port()
    sup = FirstCheckerHangs([http_program(port)], on_event=events.append)
    sup.start()
    try:
        frozen_checker_is_replaced(sup, events)
    finally:
        sup.stop()


def frozen_checker_is_replaced(sup: FirstCheckerHangs, events: list[AgentEvent]) -> None:
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    assert sup.snapshot()[1].generation == 1
    sup.hang.set()
    wd = wait_for("new checker", lambda: (wd := sup.snapshot()[1]).generation == 2 and wd.checker_alive and wd)
    assert wd.thread_restarts == 1 and wd.guard_alive
    # the event is sent by the guard after it has published the new checker
    wait_for("watchdog_restarted event", lambda: any(e.kind == "watchdog_restarted" for e in events))
    os.kill(p["pid"], signal.SIGKILL)
    wait_for("restarted by the new checker", lambda: (q := proc(sup))["pid"] not in (None, p["pid"])
             and q["state"] == "running")
    assert sup.snapshot()[1].generation == 2  # the stale checker never came back


def test_staff_commands_stop_start_restart(make_sup) -> None:
    port = free_port()
    sup = make_sup(http_program(port))
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    assert "stopped" in sup.command("web", "stop").result(10)
    assert proc(sup)["state"] == "stopped" and not pid_alive(p["pid"])
    time.sleep(0.5)
    assert proc(sup)["state"] == "stopped"  # a stopped process stays stopped
    assert "started" in sup.command("web", "start").result(10)
    q = wait_for("running", lambda: (q := proc(sup))["state"] == "running" and q)
    assert "restarted" in sup.command("web", "restart").result(10)
    r = wait_for("running", lambda: (r := proc(sup))["state"] == "running" and r["pid"] != q["pid"] and r)
    assert r["pid"] != q["pid"]
    with pytest.raises(KeyError):
        sup.command("nope", "restart").result(1)


FILE_PROGRAM = ("import pathlib, sys, time\np = pathlib.Path(sys.argv[1])\n"
                "while True:\n    p.touch()\n    time.sleep(0.05)\n")
NOTIFY_PROGRAM = ("import os, socket, time\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                  "while True:\n    s.sendto(b'WATCHDOG=1', os.environ['NOTIFY_SOCKET'])\n    time.sleep(0.05)\n")
# listens for a moment, then stops listening but stays alive: a TCP probe must see it as dead
TCP_PROGRAM = ("import socket, sys, time\ns = socket.socket()\n"
               "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
               "s.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen()\ntime.sleep(1.5)\ns.close()\ntime.sleep(3600)\n")


@pytest.mark.parametrize("kind", ["file", "notify"])
def test_file_and_notify_liveness_replace_a_frozen_process(make_sup, tmp_path, kind: str) -> None:
    beat = tmp_path / "beat"
    program = FILE_PROGRAM if kind == "file" else NOTIFY_PROGRAM
    liveness = LivenessSpec(kind=kind, path=str(beat) if kind == "file" else None, interval_ms=100, timeout_ms=400,
                            failures=2)
    sup = make_sup(ProcessSpec(name="web", command=[sys.executable, "-c", program, str(beat)], liveness=liveness))
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    os.kill(p["pid"], signal.SIGSTOP)
    q = wait_for("replaced", lambda: (q := proc(sup))["pid"] not in (None, p["pid"]) and q["state"] == "running" and q)
    assert "hung" in q["last_exit"]


def test_tcp_liveness_replaces_a_process_that_stopped_listening(make_sup, events) -> None:
    port = free_port()
    sup = make_sup(ProcessSpec(name="web", command=[sys.executable, "-c", TCP_PROGRAM, str(port)],
                               liveness=LivenessSpec(kind="tcp", port=port, interval_ms=100, timeout_ms=300,
                                                     failures=2)))
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    assert p["restarts"] == 0
    q = wait_for("replaced", lambda: (q := proc(sup))["pid"] not in (None, p["pid"]) and q)
    # read after the fault, from the snapshot that shows the replacement: it was counted and reported
    assert "hung" in q["last_exit"] and q["restarts"] >= 1
    wait_for("the old process killed", lambda: not pid_alive(p["pid"]))
    hung = [e for e in events if e.kind == "process_restarted" and "hung" in e.message]
    assert hung and hung[0].process == "web"


def test_watchdog_sleeps_between_checks(make_sup) -> None:
    """With nothing to do the watchdog waits; a busy loop here once cost a core per agent."""
    import resource

    sup = make_sup(ProcessSpec(name="sleeper", command=[sys.executable, "-c", "import time; time.sleep(60)"]))
    wait_for("running", lambda: proc(sup, "sleeper")["state"] == "running")
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(2.0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert used < 0.5, f"watchdog used {used:.2f}s of CPU in 2s while idle"


# a server that takes the socket the agent hands down (or binds its own), waits for its turn when
# it is a warm spare, then answers every GET with its pid
HANDDOWN_PROGRAM = """
import http.server, os, sys
from ctops import listenfds
port = int(sys.argv[1])
sock = listenfds.take("127.0.0.1", port)
listenfds.wait_for_handover()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", port), H, bind_and_activate=sock is None)
if sock is not None:
    srv.socket.close()
    srv.socket = sock
srv.serve_forever()
"""


def handdown_program(port: int, warm_spare: bool = True) -> ProcessSpec:
    return ProcessSpec(name="web", command=[sys.executable, "-c", HANDDOWN_PROGRAM, str(port)],
                       listen=f"127.0.0.1:{port}", warm_spare=warm_spare,
                       liveness=LivenessSpec(kind="http", url=f"http://127.0.0.1:{port}/", interval_ms=200,
                                             timeout_ms=300, failures=2))


def answered_by(port: int) -> int:
    return int(httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text)


def ready_spare(sup: Supervisor) -> dict:
    return wait_for("a ready warm spare", lambda: (s := sup.spare("web")) and s["ready"] and s)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_spare_takes_over_and_no_connection_is_refused(make_sup, sig: signal.Signals) -> None:
    port = free_port()
    sup = make_sup(handdown_program(port))
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    spare = ready_spare(sup)
    assert spare["pid"] != p["pid"]
    # while the active one is healthy the spare never answers
    assert {answered_by(port) for _ in range(20)} == {p["pid"]}
    with Hammer(port, "/") as hammer:
        wait_for("some answers before the fault", lambda: hammer.counts["ok"] >= 5)
        os.kill(p["pid"], sig)
        q = wait_for("the spare took over", lambda: (q := proc(sup))["pid"] == spare["pid"] and q)
        wait_for("the spare answering", lambda: answered_by(port) == spare["pid"])
        ok_after = hammer.counts["ok"]
        wait_for("answers after the takeover", lambda: hammer.counts["ok"] >= ok_after + 5)
    assert hammer.counts["refused"] == 0, hammer.counts
    assert q["restarts"] == 1 and ("SIGKILL" in q["last_exit"])
    if sig == signal.SIGSTOP:
        assert "hung" in q["last_exit"]
    # and a new spare is made ready for the next time
    assert ready_spare(sup)["pid"] not in (p["pid"], spare["pid"])


def test_without_a_spare_connections_wait_for_the_restart(make_sup) -> None:
    port = free_port()
    sup = make_sup(handdown_program(port, warm_spare=False))
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    assert sup.spare("web") is None
    with Hammer(port, "/") as hammer:
        wait_for("answers", lambda: hammer.counts["ok"] >= 5)
        os.kill(p["pid"], signal.SIGKILL)
        q = wait_for("restarted", lambda: (q := proc(sup))["pid"] not in (None, p["pid"]) and q)
        wait_for("answering", lambda: answered_by(port) == q["pid"])
    assert hammer.counts["refused"] == 0, hammer.counts


def test_stopped_listening_process_refuses_and_start_listens_again(make_sup) -> None:
    port = free_port()
    sup = make_sup(handdown_program(port))
    wait_for("running", lambda: proc(sup)["state"] == "running")
    spare = ready_spare(sup)
    assert "stopped" in sup.command("web", "stop").result(10)
    # no process and no spare: the port refuses rather than keeping clients waiting for nobody
    assert get(port, "/") == "refused" and sup.spare("web") is None
    wait_for("spare gone", lambda: not pid_alive(spare["pid"]))
    sup.command("web", "start").result(10)
    q = wait_for("running", lambda: (q := proc(sup))["state"] == "running" and q)
    assert answered_by(port) == q["pid"]


def test_staff_restart_starts_a_fresh_process_not_the_spare(make_sup) -> None:
    port = free_port()
    sup = make_sup(handdown_program(port))
    p = wait_for("running", lambda: (p := proc(sup))["state"] == "running" and p)
    spare = ready_spare(sup)
    assert "restarted" in sup.command("web", "restart").result(10)
    q = wait_for("running", lambda: (q := proc(sup))["state"] == "running" and q["pid"] != p["pid"] and q)
    assert q["pid"] != spare["pid"]
    wait_for("old spare gone", lambda: not pid_alive(spare["pid"]))


def test_a_socket_handed_to_another_pid_is_not_taken() -> None:
    """LISTEN_PID naming another process: the socket on fd 3 is not this server's to take, so it
    binds its own port (here taken by that very socket, so it fails to start rather than serve)."""
    port = free_port()
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", port))
    other.listen()
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())}
    child = subprocess.Popen(["/bin/sh", "-c", 'exec 3<&0 0</dev/null; exec "$@"', "sh", sys.executable, "-c",
                              HANDDOWN_PROGRAM, str(port)], stdin=other.fileno(), env=env,
                             stderr=subprocess.PIPE)
    try:
        _, err = child.communicate(timeout=30)
        assert child.returncode != 0 and b"Address already in use" in err
    finally:
        child.kill()
        child.wait()
        other.close()

"""README claims about agents, each shown end to end through a real agent and dispatcher: a crash
loop ends in `fatal` with one `crash_loop` event, `restart = on-failure | never`, `stop_grace_ms`
then SIGKILL, tailed `log_files` reaching the exception store, and `host_lost` / `host_back`."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.cluster import Cluster, events, host, wait_for

# fails the first time (leaves a mark), then ends well
FAIL_ONCE = "import os, sys\nm = sys.argv[1]\nif not os.path.exists(m):\n    open(m, 'w').close()\n    sys.exit(4)\n"
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(3600)\n"
POLITE = "import time\ntime.sleep(3600)\n"


def py(code: str, *args: str) -> str:
    """A TOML array running `code` with this interpreter."""
    return json.dumps([sys.executable, "-c", code, *args])


def processes_toml(mark: Path) -> str:
    """Processes of host-1 (the cluster's last [[agents]] entry, so these tables attach to it)."""
    entries = [
        ("crashy", py("import sys; sys.exit(3)"), 'restart = "always"\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\n'
                                                  "crashloop_restarts = 3\ncrashloop_window_ms = 60000"),
        ("clean-exit", py("pass"), 'restart = "on-failure"'),
        ("fails-once", py(FAIL_ONCE, str(mark)), 'restart = "on-failure"\nbackoff_initial_ms = 50'),
        ("never", py("import sys; sys.exit(5)"), 'restart = "never"'),
        ("stubborn", py(STUBBORN), "stop_grace_ms = 500"),
        ("polite", py(POLITE), "stop_grace_ms = 30000"),
    ]
    return "\n".join(f'[[agents.processes]]\nname = "{n}"\ncommand = {cmd}\n{extra}\n' for n, cmd, extra in entries)


def procs(c: Cluster) -> dict[str, dict]:
    return {p["name"]: p for p in host(c, "host-1")["processes"]}


def heartbeats_after(c: Cluster, n: int) -> bool:
    """True once host-1's agent has sent `n` more heartbeats than when first asked (an ordering
    point: what the agent knew then has reached the dispatcher)."""
    seq = host(c, "host-1")["seq"] or 0
    return bool(wait_for(f"{n} more heartbeats", lambda: (host(c, "host-1")["seq"] or 0) >= seq + n, 60))


def test_restart_policies_crash_loop_and_stop_grace_through_a_real_agent(
        make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    c = make_cluster(trainers=1, extra_toml=processes_toml(tmp_path / "failed-once"))
    c.start("trainer-1")
    c.start("A")
    c.start("host-1")
    wait_for("every process reported", lambda: len(procs(c)) == 6, 60)

    # a crash loop: backoff, then fatal, shown in the state, with exactly one crash_loop event
    crashy = wait_for("crashy fatal", lambda: (p := procs(c)["crashy"])["state"] == "fatal" and p, 60)
    assert crashy["restarts"] == 3 and "status 3" in (crashy["last_exit"] or ""), crashy
    # restart policies: a clean exit under on-failure and any exit under never stay stopped; a
    # failure under on-failure is restarted (here it then ends well, and stays stopped)
    p = wait_for("policies settled", lambda: (p := procs(c))["clean-exit"]["state"] == "stopped"
                 and p["never"]["state"] == "stopped" and p["fails-once"]["state"] == "stopped" and p, 60)
    assert p["clean-exit"]["restarts"] == 0 and "status 0" in (p["clean-exit"]["last_exit"] or "")
    assert p["never"]["restarts"] == 0 and "status 5" in (p["never"]["last_exit"] or "")
    assert p["fails-once"]["restarts"] == 1 and "status 0" in (p["fails-once"]["last_exit"] or "")
    heartbeats_after(c, 3)
    after = procs(c)
    assert after["crashy"]["state"] == "fatal" and after["crashy"]["restarts"] == 3  # no restart after fatal
    assert after["clean-exit"]["restarts"] == 0 and after["never"]["restarts"] == 0
    loops = [e for e in events(c) if e["kind"] == "crash_loop"]
    assert len(loops) == 1 and loops[0]["target"] == "crashy" and loops[0]["severity"] == "critical", loops

    # stop_grace_ms: SIGTERM first; one that ignores it is SIGKILLed after the grace
    wait_for("stubborn and polite running", lambda: procs(c)["stubborn"]["state"] == "running"
             and procs(c)["polite"]["state"] == "running", 60)
    url = c.ops_url() + "/api/v1/hosts/host-1/processes/{}/stop"
    r = httpx.post(url.format("stubborn"), headers=c.auth("operator"), timeout=60)
    assert r.status_code == 200 and "SIGKILL" in r.json()["message"], r.text
    r = httpx.post(url.format("polite"), headers=c.auth("operator"), timeout=60)
    assert r.status_code == 200 and "SIGTERM" in r.json()["message"], r.text
    p = wait_for("both stopped", lambda: (p := procs(c))["stubborn"]["state"] == "stopped"
                 and p["polite"]["state"] == "stopped" and p, 30)
    assert "SIGKILL" in p["stubborn"]["last_exit"] and "SIGTERM" in p["polite"]["last_exit"], p


TRACEBACK = """2026-01-01 12:00:00 ERROR trainer: submission failed
Traceback (most recent call last):
  File "/srv/trainer/grading.py", line 12, in grade_submission
    score = total / count
ZeroDivisionError: division by zero
"""


def test_log_files_reach_the_exception_store_and_a_silent_host_is_lost_then_back(
        make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    c = make_cluster(trainers=1, timings={"heartbeat_timeout_ms": 3000})
    logs = tmp_path / "applogs"
    logs.mkdir()
    app_log = logs / "trainer.log"
    app_log.write_text("2026-01-01 11:59:59 INFO trainer: started\n")
    text = c.config.read_text()
    entry = 'name = "host-1"\n'
    assert text.count(entry) == 1
    c.config.write_text(text.replace(entry, entry + f'log_files = ["{logs}/*.log"]\n'))
    c.env["CTOPS_CAPTURE_SPOOL"] = str(tmp_path / "spool")
    c.start("trainer-1")
    c.start("A")
    c.start("host-1")
    # the agent has looked at the file (from its end: history is not news) once it records an offset
    state = tmp_path / "spool" / "logtail-host-1" / "logtail.json"
    wait_for("the log file followed", lambda: str(app_log) in json.loads(state.read_text()), 60)
    with app_log.open("a") as f:
        f.write(TRACEBACK)

    def group() -> dict | None:
        r = httpx.get(c.ops_url() + "/api/v1/exceptions/groups", headers=c.auth("viewer"), timeout=10)
        return next((g for g in r.json()["groups"] if g["type"] == "ZeroDivisionError"), None)

    g = wait_for("the traceback as an exception group", group, 60)
    assert g["message"] == "division by zero" and g["count"] == 1 and "host-1" in g["hosts"], g
    assert "grade_submission" in g["culprit"], g
    wait_for("host-1 alive", lambda: host(c, "host-1")["state"] == "alive", 30)
    assert not [e for e in events(c) if e["kind"] == "host_lost"]

    # an agent that falls silent makes its host lost (one critical event), and back when it returns
    c.signal("host-1", signal.SIGKILL)
    lost = wait_for("host_lost", lambda: [e for e in events(c) if e["kind"] == "host_lost"], 60)
    assert len(lost) == 1 and lost[0]["target"] == "host-1" and lost[0]["severity"] == "critical", lost
    assert host(c, "host-1")["state"] == "lost"
    assert c.server("trainer-1")["diagnosis"] != "ok"
    mark = events(c)[-1]["id"]
    c.start("host-1")
    wait_for("host_back", lambda: [e for e in events(c, after=mark) if e["kind"] == "host_back"
                                   and e["target"] == "host-1"], 60)
    assert host(c, "host-1")["state"] == "alive"
    assert len([e for e in events(c) if e["kind"] == "host_lost"]) == 1

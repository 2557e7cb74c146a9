"""The sandbox runs real child processes with real limits; each case is a learner's program."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ctops.config import Sandbox
from ctops_tools.redis_embed import EmbeddedRedis
from tests.common import FIZZBUZZ_GOOD as GOOD
from trainer import confine, sandbox
from trainer.budget import RunCgroup
from trainer.exercises import EXERCISES
from trainer.serve import PR_SET_DUMPABLE

LIMITS = Sandbox(cpu_seconds=1, memory_mb=128, max_processes=16, wall_seconds=4, output_max_bytes=16384)
FIZZ = EXERCISES["fizzbuzz"]
SECRET = "s3cr3t-value-for-ctops-test"


async def run(code: str) -> sandbox.RunResult:
    return await asyncio.wait_for(sandbox.run(FIZZ, code, LIMITS), 60)


async def test_correct_solution_passes() -> None:
    r = await run(GOOD)
    assert r.verdict == "passed", r
    assert [t.name for t in r.tests] == [t.name for t in FIZZ.tests]
    assert all(t.passed for t in r.tests)


async def test_wrong_solution_fails_naming_the_test() -> None:
    r = await run("def fizzbuzz(n):\n    return str(n)\n")
    assert r.verdict == "failed"
    failing = {t.name: t.message for t in r.tests if not t.passed}
    assert set(failing) == {"three", "five", "fifteen"}
    assert failing["three"] == "fizzbuzz(3) returned '3', expected 'Fizz'"
    assert "three" in r.message


async def test_missing_function_and_syntax_error_are_errors() -> None:
    r = await run("def fizz(n):\n    return n\n")
    assert r.verdict == "error" and "fizzbuzz" in r.message
    r = await run("def fizzbuzz(n)\n    return n\n")
    assert r.verdict == "error" and "SyntaxError on line 1" in r.message


async def test_exception_in_learner_code_is_a_failed_test() -> None:
    r = await run("def fizzbuzz(n):\n    return 1 / 0\n")
    assert r.verdict == "failed"
    assert "ZeroDivisionError" in r.tests[0].message


async def test_infinite_loop_is_a_timeout() -> None:
    r = await run("def fizzbuzz(n):\n    while True:\n        pass\n")
    assert r.verdict == "timeout"
    assert "CPU" in r.message or "wall time" in r.message


async def test_blocking_forever_is_a_timeout() -> None:
    r = await run("import time\ndef fizzbuzz(n):\n    time.sleep(3600)\n")
    assert r.verdict == "timeout" and "wall time" in r.message


async def test_memory_hog_is_memory() -> None:
    r = await run("def fizzbuzz(n):\n    hog = []\n    while True:\n        hog.append(' ' * 10**7)\n")
    assert r.verdict == "memory"
    assert "128 MB" in r.message


async def test_fork_bomb_is_stopped_and_the_next_run_is_fine() -> None:
    r = await run("import os\ndef fizzbuzz(n):\n    while True:\n        os.fork()\n")
    assert r.verdict in ("error", "killed", "timeout"), r
    if r.verdict == "error":
        assert "too many processes" in r.message
    # a bomb that swallows the error and keeps forking ends too
    r = await run("import os\ndef fizzbuzz(n):\n    while True:\n        try:\n            os.fork()\n"
                  "        except OSError:\n            pass\n")
    assert r.verdict in ("error", "killed", "timeout"), r
    assert (await run(GOOD)).verdict == "passed"


async def test_process_escaping_the_group_does_not_hold_the_run() -> None:
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3600)\n" + GOOD
    r = await run(code)
    assert r.verdict == "passed", r


@pytest.fixture
def server_like(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test process plays the server: a secret in its environment, and non-dumpable as the
    trainer makes itself at start."""
    monkeypatch.setenv("CTOPS_SECRET_FOR_TEST", SECRET)
    prctl = ctypes.CDLL(None).prctl
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    yield
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


async def test_learner_code_cannot_see_server_environment(server_like: None) -> None:
    code = f"""
import os
def fizzbuzz(n):
    seen = repr(dict(os.environ))
    for path in ("/proc/self/environ", f"/proc/{{os.getppid()}}/environ"):
        try:
            seen += open(path, errors="replace").read()
        except OSError as exc:
            seen += "denied " + path
    if n == 1:
        return sorted(os.environ)
    return "LEAKED" if {SECRET!r} in seen or "CTOPS_SECRET_FOR_TEST" in seen else "safe"
"""
    r = await run(code)
    messages = {t.name: t.message for t in r.tests}
    assert "['LANG', 'PATH']" in messages["one"]
    assert "'safe'" in messages["three"], messages["three"]
    assert all(SECRET not in m and "LEAKED" not in m for m in messages.values())


async def test_huge_file_is_stopped() -> None:
    r = await run("def fizzbuzz(n):\n    with open('big', 'wb') as f:\n        while True:\n"
                  "            f.write(b'x' * 1000000)\n")
    assert r.verdict in ("error", "killed")
    assert "file" in r.message


async def test_output_flood_is_capped() -> None:
    r = await run("import os\ndef fizzbuzz(n):\n    while True:\n        os.write(1, b'x' * 100000)\n")
    assert r.verdict == "error" and "printed more than" in r.message
    # print() output is swallowed by the harness and does not disturb the results
    r = await run("def fizzbuzz(n):\n    print('x' * 100000)\n" + GOOD.replace("def fizzbuzz", "def _f"))
    assert r.verdict == "failed"


async def test_parallel_runs_do_not_disturb_each_other() -> None:
    bomb = "import os\ndef fizzbuzz(n):\n    while True:\n        os.fork()\n"
    results = await asyncio.gather(run(GOOD), run(bomb), run(GOOD))
    assert results[0].verdict == "passed" and results[2].verdict == "passed"


# --- confinement (issue 13): no network, no shared leftovers, one budget per run, verdicts outside ----
def _available(network: str) -> Sandbox:
    limits = LIMITS.model_copy(update={"network": network})
    conf = sandbox.confinement(limits)
    if conf.network != network:
        pytest.skip(f"network confinement {network!r} is not available here: {conf.notes}")
    return limits


@pytest.fixture(params=["namespace", "seccomp"])
def confined(request: pytest.FixtureRequest) -> Sandbox:
    return _available(request.param)


def _returned(r: sandbox.RunResult) -> str:
    """What the learner's fizzbuzz(1) returned, from the failing test's message."""
    return r.tests[0].message


CONNECT = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), 2).sendall({payload!r})
    OUTCOME = "connected"
except OSError as exc:
    OUTCOME = "no connection: " + type(exc).__name__
def fizzbuzz(n):
    return OUTCOME
"""


async def test_learner_code_cannot_reach_a_loopback_listener(confined: Sandbox) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        code = CONNECT.format(port=listener.getsockname()[1], payload=b"hello")
        r = await sandbox.run(FIZZ, code, confined)
        assert "no connection" in _returned(r), r
        with pytest.raises(BlockingIOError):
            listener.accept()


async def test_learner_code_cannot_reach_redis(confined: Sandbox, redis_server: EmbeddedRedis) -> None:
    key = f"ctops-sbx-test-{uuid.uuid4().hex}"
    code = CONNECT.format(port=redis_server.port, payload=f"SET {key} owned\r\n".encode())
    r = await sandbox.run(FIZZ, code, confined)
    assert "no connection" in _returned(r), r
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.exists(key) == 0
    finally:
        client.close()


def _any_exists(names: list[str]) -> bool:
    return any(os.path.exists(n) for n in names)


async def test_files_in_tmp_and_shm_stay_private_to_the_run(confined: Sandbox) -> None:
    names = [f"{d}/ctops-sbx-leak-{uuid.uuid4().hex}" for d in ("/dev/shm", "/tmp")]
    code = f"""
import os, time
for name in {names!r}:
    with open(name, "w") as f:
        f.write("left behind")
SEEN = all(os.path.exists(n) for n in {names!r})
time.sleep(1.5)
def fizzbuzz(n):
    return "wrote both" if SEEN else "could not write"
"""
    task = asyncio.create_task(sandbox.run(FIZZ, code, confined))
    seen_on_host = False
    while not task.done():
        seen_on_host |= _any_exists(names)
        await asyncio.sleep(0.02)
    r = task.result()
    assert "'wrote both'" in _returned(r), r
    assert not seen_on_host
    assert not _any_exists(names)


CHILDREN = """
import os, time
pids = []
for _ in range({n}):
    pid = os.fork()
    if pid == 0:
        hold = b"x" * (64 * 1024 * 1024)
        time.sleep(1)
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
"""


async def test_memory_budget_is_for_the_whole_run() -> None:
    limits = LIMITS.model_copy(update={"memory_mb": 256, "max_processes": 32, "wall_seconds": 20, "cpu_seconds": 5})
    if sandbox.confinement(limits).budget == "rlimit":
        pytest.skip("no cgroup for a whole-run budget here; per-process rlimits only (the documented fallback)")
    r = await sandbox.run(FIZZ, CHILDREN.format(n=1) + GOOD, limits)
    assert r.verdict == "passed", r
    r = await sandbox.run(FIZZ, CHILDREN.format(n=10) + GOOD, limits)
    assert r.verdict == "memory", r
    assert "256 MB" in r.message


FORGE = """
import json, os
OLD = b'\\x1ectops ' + json.dumps({{"event": "test", "name": "one", "passed": True, "limit": None,
                                   "message": ""}}).encode() + b'\\n'
NEW = b"".join(json.dumps(e).encode() + b"\\n" for e in (
    {{"event": "load", "ok": True}},
    *({{"event": "test", "name": n, "passed": True}} for n in ("one", "three", "five", "fifteen", "ninety_eight")),
    {{"event": "done"}}))
for fd in range(1, 1024):
    try:
        os.write(fd, OLD * 5 + NEW)
    except OSError:
        pass
print(OLD.decode())
{function}
"""


async def test_a_forged_report_is_not_a_pass() -> None:
    r = await run(FORGE.format(function="def fizzbuzz(n):\n    return None\n"))
    assert r.verdict == "failed", r
    assert "0 of 5 tests passed" in r.message
    # the attack of the finding: forged passes for code that defines no function
    r = await run(FORGE.format(function=""))
    assert r.verdict == "error" and "define a function named fizzbuzz" in r.message, r


async def test_expected_answers_are_not_in_the_sandbox() -> None:
    # an expected value of fizzbuzz, spelled so that this code does not contain it itself
    code = """
import os, sys
WANTED = "Fizz" + "Buzz"
FOUND = []
for d in (".", "/tmp", "/dev/shm"):
    for root, _, files in os.walk(d):
        for f in files:
            try:
                with open(os.path.join(root, f), errors="replace") as fh:
                    if WANTED in fh.read():
                        FOUND.append(os.path.join(root, f))
            except OSError:
                pass
for fd in range(0, 64):
    try:
        if WANTED.encode() in os.read(fd, 1 << 20):
            FOUND.append(fd)
    except OSError:
        pass
def fizzbuzz(n):
    return "found in " + repr(FOUND) if FOUND else "nowhere; files: " + repr(sorted(os.listdir(".")))
"""
    r = await run(code)
    assert "nowhere; files: ['harness.py', 'solution.py']" in _returned(r), r


async def test_confinement_in_force_is_reported() -> None:
    conf = sandbox.confinement(LIMITS)
    # what this machine offers (root, namespaces, writable cgroup v1): the strongest of each
    assert conf.network in ("namespace", "seccomp") and conf.refused is None, conf
    assert conf.budget in ("cgroup2", "cgroup1", "rlimit")
    assert conf.to_dict()["runs_code"] is True


async def test_unconfined_code_is_refused_unless_allowed() -> None:
    unconfined = LIMITS.model_copy(update={"network": "none"})
    conf = sandbox.confinement(unconfined)
    assert conf.network == "none" and conf.refused and "allow_unconfined" in conf.refused
    code = "import os\nos.makedirs('/var/tmp/never', exist_ok=True)\n" + GOOD
    r = await sandbox.run(FIZZ, code, unconfined)
    assert r.verdict == "error" and "may not run code" in r.message and "allow_unconfined" in r.message, r
    assert r.tests == []
    allowed = unconfined.model_copy(update={"allow_unconfined": True})
    assert sandbox.confinement(allowed).refused is None
    assert (await sandbox.run(FIZZ, GOOD, allowed)).verdict == "passed"


def test_leftovers_of_a_killed_server_are_reclaimed_once_no_run_holds_their_uid() -> None:
    conf = sandbox.confinement(LIMITS)
    if os.geteuid() != 0:
        pytest.skip("per-run uids, and so leftovers to reclaim, exist only when the server is root")
    uid, lock = sandbox._acquire_uid()
    try:
        # what a server SIGKILLed mid-run leaves: its run's scratch directory and cgroup
        scratch = Path(tempfile.mkdtemp(prefix="ctops-sbx-"))
        os.chown(scratch, uid, uid)
        cgroup = None
        if conf.budget != "rlimit":
            cgroup = RunCgroup.create(conf.budget, list(conf.cgroup_bases), f"ctops-sbx-{uid}", 64 << 20, 4)
        sandbox.reclaim_leftovers(conf)
        assert scratch.exists(), "a run holding the uid keeps its files"
    finally:
        os.close(lock)
    sandbox.reclaim_leftovers(conf)
    assert not scratch.exists()
    assert cgroup is None or not any(d.exists() for d in cgroup.dirs)


def test_without_mount_namespaces_a_runs_files_are_swept_from_the_shared_dirs() -> None:
    if os.geteuid() != 0:
        pytest.skip("the sweep knows a run's files by its uid, which exists only when the server is root")
    uid, lock = sandbox._acquire_uid()
    try:
        mine, other = (Path(f"/dev/shm/ctops-sbx-sweep-{uuid.uuid4().hex}") for _ in range(2))
        mine.write_text("left by the run")
        os.chown(mine, uid, uid)
        other.write_text("not the run's")
        confine.sweep_files(uid)
        assert not mine.exists() and other.exists()
    finally:
        os.close(lock)
        other.unlink(missing_ok=True)

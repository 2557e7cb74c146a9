"""The sandbox runs real child processes with real limits; each case is a learner's program."""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Iterator

import pytest

from ctops.config import Sandbox
from tests.common import FIZZBUZZ_GOOD as GOOD
from trainer import sandbox
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

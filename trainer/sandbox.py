"""Run a learner's code against an exercise's tests in a separate, limited process.

The child is `python3 -I -S` on a harness in a fresh scratch directory, with a fixed minimal
environment, its own session (so the whole process group can be killed) and resource limits.
When the server runs as root, root would ignore RLIMIT_NPROC, so the child drops to an unprivileged
uid. Each concurrent run takes its own uid from a small pool (locked with flock across processes),
so that one learner's fork bomb cannot use up another run's process quota, and so that every
process left behind, even one that escaped the process group with setsid(), can be killed by uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ctops.config import Sandbox as Limits
from trainer.exercises import Exercise

HARNESS = Path(__file__).with_name("_harness.py")
MARK = b"\x1ectops "
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# uids for sandbox runs when the server is root: far from system and login accounts
UID_BASE = 64000
UID_SLOTS = 256
LOCK_DIR = Path(tempfile.gettempdir()) / "ctops-sandbox-uids"
STDERR_MAX = 8192
# after the harness exits, how long to wait for the pipes to drain
DRAIN_SECONDS = 1.0
FILE_SIZE_MAX = 16 * 1024 * 1024

VERDICTS = ("passed", "failed", "timeout", "memory", "error", "killed")


@dataclass
class TestResult:
    name: str
    passed: bool
    message: str = ""


@dataclass
class RunResult:
    verdict: str
    message: str
    tests: list[TestResult] = field(default_factory=list)
    duration_ms: int = 0

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "message": self.message,
            "tests": [{"name": t.name, "passed": t.passed, "message": t.message} for t in self.tests],
            "duration_ms": self.duration_ms,
        }


def _world_executable(path: str) -> bool:
    """True when a uid with no special rights can reach and run the file (mode bits for others)."""
    p = Path(path)
    try:
        if not p.is_file() or not p.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in p.parents)
    except OSError:
        return False


@functools.cache
def interpreter(drops_privileges: bool) -> str:
    """The Python the sandbox runs. The harness needs only the standard library, so when the
    server's own interpreter sits where the unprivileged uid cannot reach it (e.g. under /root),
    a system python3 will do."""
    own = os.path.realpath(sys.executable)
    if not drops_privileges:
        return own
    candidates = [os.environ.get("CTOPS_SANDBOX_PYTHON", ""), own, "/usr/bin/python3", "/usr/local/bin/python3",
                  shutil.which("python3") or ""]
    for c in candidates:
        if c and _world_executable(os.path.realpath(c)):
            return os.path.realpath(c)
    raise RuntimeError(f"no Python interpreter that uid {UID_BASE}+ may run; tried {[c for c in candidates if c]}"
                       "; set CTOPS_SANDBOX_PYTHON")


@contextlib.contextmanager
def _uid_slot() -> Iterator[int | None]:
    """An unused uid for this run while the server is root; None when it is not."""
    if os.geteuid() != 0:
        yield None
        return
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    start = os.getpid() % UID_SLOTS
    for i in range(UID_SLOTS):
        uid = UID_BASE + (start + i) % UID_SLOTS
        fd = os.open(LOCK_DIR / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)
        return
    raise RuntimeError("no free sandbox uid")


def _limiter(limits: Limits, uid: int | None):  # noqa: ANN202 - runs in the child between fork and exec
    cpu = limits.cpu_seconds
    mem = limits.memory_mb * 1024 * 1024
    nproc = limits.max_processes

    def apply() -> None:
        os.nice(10)  # the server's own event loop keeps priority over learners' code
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_MAX, FILE_SIZE_MAX))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return apply


async def _kill_uid(uid: int) -> None:
    """Kill every process of the sandbox uid: kill(-1) from a process running as that uid."""

    def as_uid() -> None:
        os.setgid(uid)
        os.setuid(uid)
        os.kill(-1, signal.SIGKILL)

    true = shutil.which("true") or sys.executable
    proc = await asyncio.create_subprocess_exec(
        true, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, preexec_fn=as_uid, env=ENV,
    )
    await proc.wait()


async def _read_capped(stream: asyncio.StreamReader, cap: int, sink: bytearray) -> bool:
    """Read to EOF keeping at most cap bytes; True when some were dropped."""
    dropped = False
    while chunk := await stream.read(65536):
        room = cap - len(sink)
        if room > 0:
            sink += chunk[:room]
        dropped = dropped or len(chunk) > room
    return dropped


def _prepare(exercise: Exercise, code: str, limits: Limits, uid: int | None) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="ctops-sbx-"))
    (scratch / "solution.py").write_text(code, encoding="utf-8")
    spec = {
        "solution": str(scratch / "solution.py"),
        "function": exercise.function,
        "tests": [{"name": t.name, "call": t.call, "expected": t.expected} for t in exercise.tests],
        "limits": limits.model_dump(),
    }
    (scratch / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    shutil.copyfile(HARNESS, scratch / "harness.py")
    for f in scratch.iterdir():
        f.chmod(0o444)
    if uid is not None:
        os.chown(scratch, uid, uid)
    scratch.chmod(0o700)
    return scratch


async def run(exercise: Exercise, code: str, limits: Limits) -> RunResult:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with _uid_slot() as uid:
        scratch = await asyncio.to_thread(_prepare, exercise, code, limits, uid)
        try:
            result = await _run_in(scratch, limits, uid)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
    result.duration_ms = int((loop.time() - started) * 1000)
    return result


async def _run_in(scratch: Path, limits: Limits, uid: int | None) -> RunResult:
    proc = await asyncio.create_subprocess_exec(
        interpreter(uid is not None), "-I", "-S", "-B", str(scratch / "harness.py"), str(scratch / "spec.json"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=scratch, env=ENV, start_new_session=True, preexec_fn=_limiter(limits, uid),
    )
    out, err = bytearray(), bytearray()
    assert proc.stdout and proc.stderr
    readers = asyncio.gather(
        _read_capped(proc.stdout, limits.output_max_bytes, out),
        _read_capped(proc.stderr, STDERR_MAX, err),
    )
    wall_hit = False
    try:
        await asyncio.wait_for(proc.wait(), limits.wall_seconds)
    except TimeoutError:
        wall_hit = True
    finally:
        # children of the learner's code may outlive the harness: kill the group, then the uid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if uid is not None:
            await _kill_uid(uid)
        if proc.returncode is None:
            await proc.wait()
    try:
        overflow, _ = await asyncio.wait_for(readers, DRAIN_SECONDS)
    except TimeoutError:
        # a grandchild in another session still holds the pipe (only possible when not root)
        overflow = True
    return interpret(bytes(out), bytes(err), proc.returncode, wall_hit, overflow, limits)


def interpret(out: bytes, err: bytes, returncode: int | None, wall_hit: bool, overflow: bool,
              limits: Limits) -> RunResult:
    events = []
    for line in out.split(b"\n"):
        if line.startswith(MARK):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line[len(MARK):]))
    tests = [TestResult(e["name"], bool(e["passed"]), e.get("message", ""))
             for e in events if e.get("event") == "test"]
    load = next((e for e in events if e.get("event") == "load"), None)
    done = any(e.get("event") == "done" for e in events)
    limits_hit = {e.get("limit") for e in events} - {None}
    stderr = err.decode(errors="replace")

    def result(verdict: str, message: str) -> RunResult:
        return RunResult(verdict, message, tests)

    if wall_hit:
        return result("timeout", f"stopped after {limits.wall_seconds:g} s of wall time; is something waiting "
                                 f"forever or looping?")
    if "cpu" in limits_hit or returncode == -signal.SIGXCPU:
        return result("timeout", f"stopped after using {limits.cpu_seconds} s of CPU time; is there an "
                                 f"endless loop?")
    if "memory" in limits_hit or "MemoryError" in stderr:
        return result("memory", f"ran out of memory (limit {limits.memory_mb} MB)")
    if "processes" in limits_hit:
        return result("error", f"your code tried to start too many processes (limit {limits.max_processes})")
    if "file_size" in limits_hit or returncode == -signal.SIGXFSZ:
        return result("error", f"your code tried to write a file larger than {FILE_SIZE_MAX // (1024 * 1024)} MB")
    if load is not None and not load.get("ok"):
        return result("error", load.get("message", "your code could not be loaded"))
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return result("killed", f"your program was killed by {name} before it finished")
    if not done:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        extra = " (it printed too much output)" if overflow else ""
        return result("error", f"the test run ended early{extra}: {tail[0][:300]}")
    failed = [t.name for t in tests if not t.passed]
    if failed:
        return result("failed", f"{len(tests) - len(failed)} of {len(tests)} tests passed; failing: "
                                f"{', '.join(failed)}")
    return result("passed", f"all {len(tests)} tests passed")

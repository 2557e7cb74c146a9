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
import ctypes
import fcntl
import functools
import itertools
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
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
PR_SET_CHILD_SUBREAPER = 36

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


_next_slot = itertools.count(os.getpid())


def _acquire_uid() -> tuple[int, int]:
    """(uid, lock fd) of a slot no other run holds and no process of which is left, zombies included
    (they still count against RLIMIT_NPROC)."""
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    busy = {u for _, u, _, _ in _sandbox_procs()}
    start = next(_next_slot)
    for i in range(UID_SLOTS):
        uid = UID_BASE + (start + i) % UID_SLOTS
        if uid in busy:
            continue
        fd = os.open(LOCK_DIR / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    raise RuntimeError("no free sandbox uid: all are in use or hold leftover processes")


@contextlib.asynccontextmanager
async def _uid_slot() -> AsyncIterator[int | None]:
    """An unused uid for this run while the server is root; None when it is not."""
    if os.geteuid() != 0:
        yield None
        return
    uid, fd = await asyncio.to_thread(_acquire_uid)
    try:
        yield uid
    finally:
        os.close(fd)


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


_harness_pids: set[int] = set()


def become_subreaper() -> None:
    """Orphans of learners' code then come to this server (which reaps them in reap_orphans) rather
    than to PID 1, which in a container may never reap them; zombies would count against RLIMIT_NPROC."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _sandbox_procs() -> list[tuple[int, int, bool, int]]:
    """(pid, uid, zombie, ppid) of every process running as a sandbox uid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _proc_status(int(entry.name))
        if not st.get("Uid"):
            continue
        uid = int(st["Uid"].split()[0])
        if UID_BASE <= uid < UID_BASE + UID_SLOTS:
            found.append((int(entry.name), uid, st.get("State", "").startswith("Z"), int(st.get("PPid", "0"))))
    return found


def sweep_uid(uid: int) -> None:
    """Kill every live process of a sandbox uid (repeating, as a fork bomb may fork meanwhile), then
    reap the zombies that were reparented to this server."""
    for _ in range(100):
        live = [pid for pid, u, zombie, _ in _sandbox_procs() if u == uid and not zombie]
        if not live:
            break
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    reap_orphans()


def reap_orphans() -> None:
    """Reap zombie children that ran as a sandbox uid, except harnesses asyncio itself waits for."""
    me = os.getpid()
    for pid, _, zombie, ppid in _sandbox_procs():
        if zombie and ppid == me and pid not in _harness_pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


async def _read_capped(stream: asyncio.StreamReader, cap: int, sink: bytearray,
                       on_overflow: Callable[[], None] | None = None) -> bool:
    """Read to EOF keeping at most cap bytes; True when some were dropped."""
    dropped = False
    while chunk := await stream.read(65536):
        room = cap - len(sink)
        if room > 0:
            sink += chunk[:room]
        if len(chunk) > room and not dropped:
            dropped = True
            if on_overflow:
                on_overflow()
    return dropped


async def _exited(proc: asyncio.subprocess.Process) -> None:
    # Process.wait() on 3.11 also waits for the pipes to close, which a grandchild can hold open
    while proc.returncode is None:  # noqa: ASYNC110 - asyncio gives no other exit-only signal
        await asyncio.sleep(0.01)


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
    async with _uid_slot() as uid:
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
    _harness_pids.add(proc.pid)
    out, err = bytearray(), bytearray()
    assert proc.stdout and proc.stderr

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    readers = asyncio.gather(
        _read_capped(proc.stdout, limits.output_max_bytes, out, kill_group),
        _read_capped(proc.stderr, STDERR_MAX, err),
    )
    wall_hit = False
    try:
        await asyncio.wait_for(_exited(proc), limits.wall_seconds)
    except TimeoutError:
        wall_hit = True
    finally:
        # children of the learner's code may outlive the harness: kill the group, then the uid
        kill_group()
        if uid is not None:
            await asyncio.to_thread(sweep_uid, uid)
        while proc.returncode is None:  # noqa: ASYNC110 - as in _exited
            await asyncio.sleep(0.01)
        _harness_pids.discard(proc.pid)
    try:
        overflow, _ = await asyncio.wait_for(readers, DRAIN_SECONDS)
    except TimeoutError:
        # a grandchild in another session still holds the pipe (only possible when not root)
        overflow = True
        readers.cancel()
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
    if overflow and not done:
        return result("error", f"your program printed more than {limits.output_max_bytes} bytes and was stopped")
    if load is not None and not load.get("ok"):
        return result("error", load.get("message", "your code could not be loaded"))
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return result("killed", f"your program was killed by {name} before it finished")
    if not done:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        return result("error", f"the test run ended early: {tail[0][:300]}")
    failed = [t.name for t in tests if not t.passed]
    if failed:
        return result("failed", f"{len(tests) - len(failed)} of {len(tests)} tests passed; failing: "
                                f"{', '.join(failed)}")
    return result("passed", f"all {len(tests)} tests passed")

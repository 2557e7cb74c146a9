"""Run a learner's code against an exercise's tests in a separate, limited process.

The child is `python3 -I -S` on a harness in a fresh scratch directory, with a fixed minimal
environment, its own session (so the whole process group can be killed) and resource limits.
When the server runs as root, root would ignore RLIMIT_NPROC, so the child drops to an unprivileged
uid. Each concurrent run takes its own uid from a small pool (locked with flock across processes),
so that one learner's fork bomb cannot use up another run's process quota, and so that every
process left behind, even one that escaped the process group with setsid(), can be killed by uid.

What else confines the run (trainer/confine.py, trainer/budget.py) is probed once per setting, at
the server's start (confinement()): no network, private /tmp and /dev/shm, and one memory and
process budget for the whole run. Learner code is not run at all when it could reach the network,
unless [sandbox] allow_unconfined says so.

The verdict is decided here, not in the sandbox: the harness receives only the calls to make and
returns what each returned on a pipe of its own; the expected values never leave this process.
Learner code can write to that pipe too, but can then only claim return values, which are compared
like real ones; what it writes on stdout is merely captured.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import itertools
import json
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ctops.config import Sandbox as Limits
from trainer import budget, confine
from trainer.budget import RunCgroup
from trainer.exercises import Exercise

log = logging.getLogger("trainer.sandbox")

HARNESS = Path(__file__).with_name("_harness.py")
HARNESS_NAME = "harness.py"
# Python makes the script's path absolute; the scratch directory's own path is hidden under the
# run's private /tmp, so the harness is named through the working directory it was started in
HARNESS_ARG = f"/proc/self/cwd/{HARNESS_NAME}"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
# uids for sandbox runs when the server is root: far from system and login accounts
UID_BASE = 64000
UID_SLOTS = 256
LOCK_DIR = Path(tempfile.gettempdir()) / "ctops-sandbox-uids"
STDERR_MAX = 8192
# the harness reports each call's repr (at most 64 KiB each); more than this is learner code writing
RESULTS_MAX = 1024 * 1024
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


@dataclass(frozen=True)
class Confinement:
    """What confines a run on this machine, as probed for one [sandbox] setting."""

    network: str  # "namespace", "seccomp" or "none"
    files: str  # "namespace" (private /tmp, /var/tmp, /dev/shm, IPC), "sweep" or "none"
    budget: str  # "cgroup2", "cgroup1" or "rlimit"
    cgroup_bases: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()  # why a stronger way was not taken
    refused: str | None = None  # why learner code may not run here at all

    def to_dict(self) -> dict:
        return {"network": self.network, "files": self.files, "budget": self.budget,
                "runs_code": self.refused is None, "refused": self.refused, "notes": list(self.notes)}

    def describe(self) -> str:
        return f"network={self.network} files={self.files} budget={self.budget}"


_confinements: dict[tuple, Confinement] = {}
_detecting = threading.Lock()


def confinement(limits: Limits) -> Confinement:
    """Probe (once per setting, then remembered) and log what confines runs here. Blocking."""
    root = os.geteuid() == 0
    key = (limits.network, limits.budget, limits.allow_unconfined, root)
    with _detecting:  # runs' threads may ask at once; probe and log once
        if key not in _confinements:
            _confinements[key] = c = _detect(limits, root)
            log.info("sandbox: %s", c.describe())
            for note in c.notes:
                log.warning("sandbox: %s", note)
            if c.refused:
                log.error("sandbox: learner code will not be run: %s", c.refused)
        return _confinements[key]


def _detect(limits: Limits, root: bool) -> Confinement:
    notes: list[str] = []
    try:
        python = interpreter(root)
    except RuntimeError as exc:
        return Confinement("none", "none", "rlimit", refused=str(exc))
    namespaces = confine.probe(python, "namespaces")
    if namespaces is not None:
        notes.append(f"no namespaces: {namespaces}")
    network = "none"
    if limits.network in ("auto", "namespace") and namespaces is None:
        network = "namespace"
    elif limits.network in ("auto", "seccomp"):
        why = confine.probe(python, "seccomp")
        if why is None:
            network = "seccomp"
        else:
            notes.append(f"no seccomp: {why}")
    files = "namespace" if namespaces is None else "sweep" if root else "none"
    kind, bases, budget_notes = budget.detect(limits.budget)
    notes += budget_notes
    refused = None
    if network == "none" and not limits.allow_unconfined:
        asked = "" if limits.network == "auto" else f" [sandbox] network = {limits.network!r}:"
        refused = (f"{asked} learner code could reach the network here (no network namespace and no seccomp "
                   f"filter available); set [sandbox] allow_unconfined = true to run it anyway").strip()
    return Confinement(network, files, kind, tuple(bases), tuple(notes), refused)


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
        fd = _try_lock(uid)
        if fd is not None:
            return uid, fd
    raise RuntimeError("no free sandbox uid: all are in use or hold leftover processes")


def _try_lock(uid: int) -> int | None:
    """The uid's lock file, held, or None while another run (in any server process) holds it."""
    fd = os.open(LOCK_DIR / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def reclaim_leftovers(conf: Confinement) -> None:
    """Remove what the runs of a server killed mid-run left behind: scratch directories and cgroups,
    each known by its run's uid, taken only while that uid's lock is free (no run holds it)."""
    if os.geteuid() != 0:
        return
    scratch: dict[int, list[Path]] = {}
    for d in Path(tempfile.gettempdir()).glob("ctops-sbx-*"):
        with contextlib.suppress(OSError):
            if UID_BASE <= (owner := d.stat().st_uid) < UID_BASE + UID_SLOTS:
                scratch.setdefault(owner, []).append(d)
    cgroups = {int(d.name.removeprefix("ctops-sbx-")) for b in conf.cgroup_bases for d in b.glob("ctops-sbx-*")
               if d.name.removeprefix("ctops-sbx-").isdigit()}
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    for uid in set(scratch) | cgroups:
        fd = _try_lock(uid)
        if fd is None:
            continue
        try:
            for d in scratch.get(uid, []):
                shutil.rmtree(d, ignore_errors=True)
            if uid in cgroups:
                cg = RunCgroup(conf.budget, [b / f"ctops-sbx-{uid}" for b in conf.cgroup_bases])
                cg.kill()
                with contextlib.suppress(OSError):
                    cg.remove()
        finally:
            os.close(fd)


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


def _child_setup(limits: Limits, uid: int | None, conf: Confinement,
                 cgroup: RunCgroup | None, scratch: Path) -> Callable[[], None]:  # runs between fork and exec
    cpu = limits.cpu_seconds
    mem = limits.memory_mb * 1024 * 1024
    nproc = limits.max_processes

    def apply() -> None:
        os.nice(10)  # the server's own event loop keeps priority over learners' code
        if cgroup is not None:
            cgroup.enter()
        # here rather than cwd=: the scratch directory is out of sight once /tmp is private, and
        # uvloop (the trainer's loop) calls this before changing to cwd, unlike asyncio's own loop
        os.chdir(scratch)
        if conf.network == "namespace" or conf.files == "namespace":
            # private /tmp and /dev/shm get the run's memory limit: what is written there is memory
            confine.enter_namespaces(conf.network == "namespace", conf.files == "namespace", mem)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_MAX, FILE_SIZE_MAX))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if conf.network == "seccomp":
            confine.refuse_sockets()

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


def _prepare(code: str, uid: int | None) -> Path:
    """The run's scratch directory: the learner's code and the harness, nothing else (the calls come
    on stdin and the expected values stay here)."""
    scratch = Path(tempfile.mkdtemp(prefix="ctops-sbx-"))
    (scratch / "solution.py").write_text(code, encoding="utf-8")
    shutil.copyfile(HARNESS, scratch / HARNESS_NAME)
    for f in scratch.iterdir():
        f.chmod(0o444)
    if uid is not None:
        os.chown(scratch, uid, uid)
    scratch.chmod(0o700)
    return scratch


def _make_cgroup(conf: Confinement, uid: int | None, limits: Limits) -> RunCgroup | None:
    if conf.budget == "rlimit":
        return None
    # the uid slot is held machine-wide, so its name is unique among all servers' runs
    name = f"ctops-sbx-{uid}" if uid is not None else f"ctops-sbx-p{os.getpid()}-{next(_next_slot)}"
    return RunCgroup.create(conf.budget, list(conf.cgroup_bases), name, limits.memory_mb * 1024 * 1024,
                            limits.max_processes)


def _cleanup(scratch: Path, cgroup: RunCgroup | None, conf: Confinement, uid: int | None) -> None:
    shutil.rmtree(scratch, True)
    if cgroup is not None:
        cgroup.kill()
        try:
            cgroup.remove()
        except OSError as exc:  # the next run with this name removes it
            log.warning("sandbox: could not remove %s: %s", cgroup.dirs, exc)
    if conf.files == "sweep" and uid is not None:
        confine.sweep_files(uid)


async def run(exercise: Exercise, code: str, limits: Limits) -> RunResult:
    loop = asyncio.get_running_loop()
    started = loop.time()
    conf = await asyncio.to_thread(confinement, limits)
    if conf.refused:
        return RunResult("error", f"this server may not run code: {conf.refused}")
    async with _uid_slot() as uid:
        scratch = await asyncio.to_thread(_prepare, code, uid)
        cgroup = None
        try:
            cgroup = await asyncio.to_thread(_make_cgroup, conf, uid, limits)
            err, events, returncode, wall_hit, overflow = await _run_in(
                scratch, exercise, limits, uid, conf, cgroup)
            oom_kills = cgroup.oom_kills() if cgroup is not None else 0
        finally:
            await asyncio.to_thread(_cleanup, scratch, cgroup, conf, uid)
    result = interpret(exercise, events, err, returncode, wall_hit, overflow, oom_kills, limits)
    result.duration_ms = int((loop.time() - started) * 1000)
    return result


async def _pipe_reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader, transport


async def _send(stdin: asyncio.StreamWriter, data: bytes) -> None:
    # learner code may close its stdin or die before reading it all
    with contextlib.suppress(OSError):
        stdin.write(data)
        await stdin.drain()
        stdin.close()


async def _run_in(scratch: Path, exercise: Exercise, limits: Limits, uid: int | None, conf: Confinement,
                  cgroup: RunCgroup | None) -> tuple[bytes, list[dict], int | None, bool, bool]:
    """(stderr, events from the results pipe, exit status, wall time hit, output overflowed). The
    learner's stdout is read only to be capped: it carries no results."""
    results_r, results_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            interpreter(uid is not None), "-I", "-S", "-B", HARNESS_ARG, str(results_w),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=ENV, start_new_session=True, pass_fds=(results_w,),
            preexec_fn=_child_setup(limits, uid, conf, cgroup, scratch),
        )
    except BaseException:
        os.close(results_r)
        raise
    finally:
        os.close(results_w)
    _harness_pids.add(proc.pid)
    results, transport = await _pipe_reader(results_r)
    out, err, res = bytearray(), bytearray(), bytearray()
    assert proc.stdin and proc.stdout and proc.stderr
    spec = {"function": exercise.function, "calls": [t.call for t in exercise.tests], "limits": limits.model_dump()}
    sender = asyncio.create_task(_send(proc.stdin, json.dumps(spec).encode()))

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    readers = asyncio.gather(
        _read_capped(proc.stdout, limits.output_max_bytes, out, kill_group),
        _read_capped(proc.stderr, STDERR_MAX, err),
        _read_capped(results, RESULTS_MAX, res, kill_group),
    )
    wall_hit = False
    try:
        await asyncio.wait_for(_exited(proc), limits.wall_seconds)
    except TimeoutError:
        wall_hit = True
    finally:
        # children of the learner's code may outlive the harness: kill the group, then the uid
        kill_group()
        if cgroup is not None:
            await asyncio.to_thread(cgroup.kill)
        if uid is not None:
            await asyncio.to_thread(sweep_uid, uid)
        while proc.returncode is None:  # noqa: ASYNC110 - as in _exited
            await asyncio.sleep(0.01)
        _harness_pids.discard(proc.pid)
        sender.cancel()
    try:
        out_over, _, res_over = await asyncio.wait_for(readers, DRAIN_SECONDS)
        overflow = out_over or res_over
    except TimeoutError:
        # a grandchild in another session still holds a pipe (only possible when not root)
        overflow = True
        readers.cancel()
    finally:
        transport.close()
    events = []
    for line in bytes(res).split(b"\n"):
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if isinstance(e, dict):
                events.append(e)
    return bytes(err), events, proc.returncode, wall_hit, overflow


def _tests(exercise: Exercise, events: list[dict]) -> list[TestResult]:
    """The test results, judged here from the first reported outcome of each call."""
    reported: dict[int, dict] = {}
    for e in events:
        i = e.get("i")
        if e.get("event") == "result" and isinstance(i, int) and 0 <= i < len(exercise.tests):
            reported.setdefault(i, e)
    tests = []
    for i, case in enumerate(exercise.tests):
        if i not in reported:
            continue
        e = reported[i]
        if isinstance(e.get("value"), str):
            passed, message = case.judge(e["value"])
        else:
            passed, message = False, str(e.get("error") or f"{case.call}: no result")[:1000]
        tests.append(TestResult(case.name, passed, message))
    return tests


def interpret(exercise: Exercise, events: list[dict], err: bytes, returncode: int | None, wall_hit: bool,
              overflow: bool, oom_kills: int, limits: Limits) -> RunResult:
    tests = _tests(exercise, events)
    # any failed load counts: forged load lines could otherwise hide the harness's own
    load = next((e for e in events if e.get("event") == "load" and not e.get("ok")), None)
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
    if oom_kills:
        return result("memory", f"ran out of memory: your program and the processes it started used more than "
                                f"{limits.memory_mb} MB together")
    if "memory" in limits_hit or "MemoryError" in stderr:
        return result("memory", f"ran out of memory (limit {limits.memory_mb} MB)")
    if "processes" in limits_hit:
        return result("error", f"your code tried to start too many processes (limit {limits.max_processes})")
    if "file_size" in limits_hit or returncode == -signal.SIGXFSZ:
        return result("error", f"your code tried to write a file larger than {FILE_SIZE_MAX // (1024 * 1024)} MB")
    if overflow and not done:
        return result("error", f"your program printed more than {limits.output_max_bytes} bytes and was stopped")
    if load is not None:
        return result("error", str(load.get("message") or "your code could not be loaded")[:1000])
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return result("killed", f"your program was killed by {name} before it finished")
    if not done:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        return result("error", f"the test run ended early: {tail[0][:300]}")
    failed = [t.name for t in tests if not t.passed]
    failed += [c.name for c in exercise.tests if c.name not in {t.name for t in tests}]
    if failed:
        return result("failed", f"{len(exercise.tests) - len(failed)} of {len(exercise.tests)} tests passed; "
                                f"failing: {', '.join(failed)}")
    return result("passed", f"all {len(tests)} tests passed")

"""One memory and process budget for a whole sandbox run, all its processes together.

Each run gets its own cgroup under the server's own, with the run's memory limit and process count:
cgroup v2 when its memory and pids controllers can be enabled there, else the cgroup v1 memory and
pids hierarchies. Where neither is writable, the per-process rlimits the sandbox sets anyway are the
only bound (a run of n processes may then use n times the memory limit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

REMOVE_WAIT_SECONDS = 2.0
KILL_ROUNDS = 100


def _mounts() -> list[tuple[str, Path, str, set[str]]]:
    """(root, mount point, fs type, super options) of each cgroup mount."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            head, _, tail = line.partition(" - ")
            fields, tails = head.split(), tail.split()
            if len(fields) >= 5 and len(tails) >= 3 and tails[0] in ("cgroup", "cgroup2"):
                found.append((fields[3], Path(fields[4]), tails[0], set(tails[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """Controller ("" for cgroup v2) -> this process's cgroup path."""
    paths = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


def _under(mount: Path, root: str, path: str) -> Path:
    # a mount whose root is not "/" (a container's view) shows only part of the hierarchy
    if root != "/" and path.startswith(root):
        path = path[len(root):]
    return mount / path.lstrip("/")


def _v2_base() -> Path | str:
    own = _own_paths().get("")
    mount = next(((r, m) for r, m, t, _ in _mounts() if t == "cgroup2"), None)
    if own is None or mount is None:
        return "no cgroup v2 hierarchy is mounted"
    base = _under(mount[1], mount[0], own)
    try:
        available = set((base / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return f"cgroup v2: {exc}"
    if not {"memory", "pids"} <= available:
        return f"cgroup v2 at {base} offers the controllers {sorted(available) or 'none'}, not memory and pids"
    try:
        (base / "cgroup.subtree_control").write_text("+memory +pids")
    except OSError as exc:
        # the server's own cgroup holds processes, which cgroup v2 forbids for a parent with controllers
        return f"cgroup v2: cannot enable memory and pids below {base}: {exc}"
    return base


def _v1_bases() -> list[Path] | str:
    own = _own_paths()
    bases = []
    for controller in ("memory", "pids"):
        mount = next(((r, m) for r, m, t, o in _mounts() if t == "cgroup" and controller in o), None)
        if mount is None or controller not in own:
            return f"no cgroup v1 {controller} hierarchy is mounted"
        bases.append(_under(mount[1], mount[0], own[controller]))
    return bases


@dataclass
class RunCgroup:
    """The cgroup(s) of one run: one directory for v2, a memory and a pids one for v1."""

    kind: str
    dirs: list[Path]

    @classmethod
    def create(cls, kind: str, bases: list[Path], name: str, memory_bytes: int, max_processes: int) -> RunCgroup:
        cg = cls(kind, [b / name for b in bases])
        for d in cg.dirs:
            if d.exists():  # left by a server that died during a run: its counters must not carry over
                cg.kill()
                cg.remove()
            d.mkdir()
        try:
            cg._limit(memory_bytes, max_processes)
        except OSError:
            cg.remove()
            raise
        return cg

    def _limit(self, memory_bytes: int, max_processes: int) -> None:
        if self.kind == "cgroup2":
            d = self.dirs[0]
            (d / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):
                (d / "memory.swap.max").write_text("0")
            # an out-of-memory kill takes the whole run, not one of its processes
            with contextlib.suppress(OSError):
                (d / "memory.oom.group").write_text("1")
            (d / "pids.max").write_text(str(max_processes))
            return
        mem, pids = self.dirs
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        # memory+swap too, where swap accounting exists, so that swapping out does not escape the limit
        with contextlib.suppress(OSError):
            (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        (pids / "pids.max").write_text(str(max_processes))

    def enter(self) -> None:
        """Move the calling process into the run's cgroup(s); runs in the child before exec."""
        pid = str(os.getpid())
        for d in self.dirs:
            (d / "cgroup.procs").write_text(pid)

    def oom_kills(self) -> int:
        name = "memory.events" if self.kind == "cgroup2" else "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            for line in (self.dirs[0] / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        return found

    def kill(self) -> None:
        """Kill every process of the run, wherever it moved in the process tree or session."""
        with contextlib.suppress(OSError):
            if self.kind == "cgroup2":
                (self.dirs[0] / "cgroup.kill").write_text("1")
        for _ in range(KILL_ROUNDS):  # repeated: a fork bomb may fork meanwhile
            live = self.pids()
            if not live:
                return
            for pid in live:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Remove the cgroup(s) once their killed processes have gone (which takes a moment)."""
        deadline = time.monotonic() + REMOVE_WAIT_SECONDS
        for d in self.dirs:
            while d.exists():
                try:
                    d.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)


def detect(choice: str) -> tuple[str, list[Path], list[str]]:
    """(kind, base directories, why better kinds were not taken) for a setting of [sandbox] budget:
    the kind is "cgroup2", "cgroup1" or "rlimit"; a cgroup kind is taken only once a probe cgroup
    could be made and limited under its bases."""
    notes: list[str] = []
    order = ["cgroup2", "cgroup1"] if choice == "auto" else [choice] if choice != "rlimit" else []
    for kind in order:
        bases = _v2_base() if kind == "cgroup2" else _v1_bases()
        if isinstance(bases, str):
            notes.append(bases)
            continue
        base_list = [bases] if isinstance(bases, Path) else bases
        try:
            RunCgroup.create(kind, base_list, f"ctops-sbx-probe-{os.getpid()}", 64 << 20, 8).remove()
        except OSError as exc:
            notes.append(f"{kind}: cannot make a cgroup under {base_list[0]}: {exc}")
            continue
        return kind, base_list, notes
    return "rlimit", [], notes

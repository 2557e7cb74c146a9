"""Child processes of the demo (and of tests): started in their own session, logged to a file,
and told by the kernel to stop if their parent dies, so nothing is left behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil

_PR_SET_PDEATHSIG = 1


try:
    # looked up once here: between fork and exec only the plain call is safe
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM runs the same clean-up as Ctrl+C, so the children a command started are always stopped."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ctops_argv(*args: str) -> list[str]:
    """The same ctops the caller runs, whatever its PATH says."""
    return [sys.executable, "-m", "ctops_tools.cli", *args]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def spawn(name: str, argv: list[str], log_path: str, env: dict[str, str] | None = None,
          orphan_safe: bool = True) -> Child:
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True,
                                preexec_fn=die_with_parent if orphan_safe else None)
    return Child(name, proc, log_path)


def stop_all(children: list[Child], grace: float = 8.0) -> None:
    """SIGTERM (and SIGCONT, for frozen ones) to each, then SIGKILL what is still there."""
    for c in children:
        if c.alive():
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
                c.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    for c in children:
        try:
            c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.pid, signal.SIGKILL)
            c.proc.wait()


def kill_naming(path: str) -> list[int]:
    """SIGKILL every process whose command line names `path` (a cluster's directory): what a
    cluster's agents started outlives an agent killed after its grace, in sessions of its own as in
    production; a cluster that is stopped leaves nothing of its own running."""
    killed = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != os.getpid() and any(path in a for a in p.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed.append(p.info["pid"])
    return killed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

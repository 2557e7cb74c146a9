"""Stop one thread of a process, its other threads running on: the event-loop thread of a
dispatcher, as a blocking call on the loop would leave it, while its loop-guard thread keeps
watching. SIGSTOP cannot do this (it stops every thread, and the guard then rightly takes it for a
frozen process); ptrace stops a single thread, as a debugger's non-stop mode does.

The thread is stopped while it waits in epoll with the GIL released, as a loop blocked in a system
call (a sync socket, `time.sleep`) is: stopped holding the GIL, the other threads could not run a
line of Python, which is not the fault to show. Linux only; the caller must be allowed to ptrace the
process (its parent, or `kernel.yama.ptrace_scope` 0), and must stay alive: when the tracer exits,
the thread runs on.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PTRACE_CONT, PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 7, 17, 0x4206, 0x4207
WALL = 0x40000000  # __WALL: wait for threads too
# epoll_wait, epoll_pwait, epoll_pwait2 by architecture: where an idle event loop waits
EPOLL_CALLS = {"x86_64": {"232", "281", "441"}, "aarch64": {"22", "441"}}


class ThreadStopError(Exception):
    pass


def _ptrace() -> Any:  # a ctypes foreign function
    libc = ctypes.CDLL(None, use_errno=True)
    f = libc.ptrace
    f.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    f.restype = ctypes.c_long
    return f


def _call(ptrace: Any, request: int, tid: int) -> None:
    if ptrace(request, tid, None, None) != 0:
        err = ctypes.get_errno()
        raise ThreadStopError(f"ptrace({request:#x}, {tid}): {os.strerror(err)}")


def _take_exit(tid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            return  # taken already (by a parent that is also the tracer)
        if done:
            return
        time.sleep(0.01)


def _in_epoll(pid: int, tid: int) -> bool:
    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
        call = f.read().split(maxsplit=1)[0]
    return call in EPOLL_CALLS.get(platform.machine(), set())


@contextmanager
def stopped_thread(pid: int, tid: int | None = None, timeout: float = 30.0) -> Iterator[None]:
    """Thread `tid` of `pid` (default: its main thread) stopped inside the block, waiting in epoll;
    it runs on afterwards, if the process still lives."""
    tid = tid or pid
    ptrace = _ptrace()
    _call(ptrace, PTRACE_SEIZE, tid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            _call(ptrace, PTRACE_INTERRUPT, tid)
            os.waitpid(tid, WALL)  # the stop: taken here, so the parent's wait never sees it
            if _in_epoll(pid, tid):
                break
            if time.monotonic() > deadline:
                raise ThreadStopError(f"thread {tid} of {pid} was never caught waiting in epoll")
            _call(ptrace, PTRACE_CONT, tid)
            time.sleep(0.01)
        yield
    finally:
        try:
            _call(ptrace, PTRACE_DETACH, tid)
        except ThreadStopError:
            # gone: the process exited while stopped. Its exit is reported to us, the tracer, first;
            # until we take it, its parent cannot reap it (a zombie its parent waits on for ever)
            _take_exit(tid)

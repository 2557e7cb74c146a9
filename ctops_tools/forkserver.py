"""Start `ctops ...` processes by forking a process that has already imported ctops (for tests).

A fresh `python -m ctops_tools.cli trainer ...` spends most of its start-up CPU importing FastAPI,
pydantic, redis and httpx: about half a second each, and a test run starts some hundreds of them on
a 2-core machine. The fork server imports all of that once, then forks one child per request; the
child starts a session of its own, writes to its log file, takes the environment it is given and
runs `ctops_tools.cli.main` with the arguments, exactly as the command line would. It is a real
process with its own pid, signals and exit; only the imports before `main` are shared.

The children are the fork server's, not the caller's: the server reaps them and reports each exit
over its socket, so `ForkedProc` answers `poll`, `wait` and `send_signal` like `subprocess.Popen`.
Nothing in the product uses this; `ctops demo` and the benches exec their processes.

What differs from an exec: /proc/<pid>/environ and /proc/<pid>/cmdline show the fork server's (the
kernel keeps those from the last exec), and the children share its hash seed. A test about what a
process's /proc entries reveal (e.g. the trainer's environment hidden from learner code,
tests/test_trainer.py) execs its processes itself.

    python -m ctops_tools.forkserver FD    (FD: this end of the caller's socket pair)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from ctops_tools.procs import Child, ctops_argv, die_with_parent, pid_alive, spawn

# what each child would import anyway; imported once, before the first fork
PRELOAD = ("ctops_tools.cli", "dispatcher.main", "trainer.main", "trainer.fake_llm", "agents.main")


# --- the server side (its own process) ------------------------------------------------------------

def _child(sock: socket.socket, req: dict[str, Any]) -> None:
    """In the forked child: become what `spawn` makes of a command, then run it. Never returns."""
    code = 1
    try:
        sock.close()
        os.setsid()
        die_with_parent()
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.environ.clear()
        os.environ.update(req["env"])
        from ctops_tools import cli

        sys.argv = [cli.__file__ or "ctops", *req["args"]]
        try:
            code = cli.main(req["args"])
        except SystemExit as exc:  # argparse, or a handler calling sys.exit
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must end here whatever happened, with the reason logged
        traceback.print_exc()
        code = 1
    finally:
        # what interpreter shutdown would do: wait for non-daemon threads, run exit hooks, flush
        with contextlib.suppress(BaseException):
            threading._shutdown()  # type: ignore[attr-defined]
        with contextlib.suppress(BaseException):
            import atexit

            atexit._run_exitfuncs()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _send(sock: socket.socket, doc: dict[str, Any]) -> None:
    sock.sendall(json.dumps(doc).encode() + b"\n")


def serve(fd: int) -> None:
    for name in PRELOAD:
        __import__(name)
    sock = socket.socket(fileno=fd)
    buf = b""
    live: set[int] = set()
    while True:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if ready:
            data = sock.recv(65536)
            if not data:  # the caller is gone; its children go too (they die with this process)
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(sock, req)
                live.add(pid)
                _send(sock, {"pid": pid})
        for pid in list(live):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                live.discard(pid)
                _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


# --- the caller side ------------------------------------------------------------------------------

class ForkedProc(subprocess.Popen):
    """A child of the fork server, answering like the `Popen` of a child of ours."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:  # no Popen.__init__: no exec here
        self._server = server
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None
        self._child_created = False  # Popen.__del__: nothing of ours to reap

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """Started on first use; `spawn` has the signature of `ctops_tools.procs.spawn`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pids: list[int] = []
        self._exits: dict[int, int] = {}
        self._gone = False

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-u", "-m", "ctops_tools.forkserver", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                      start_new_session=True, preexec_fn=die_with_parent)
        theirs.close()
        threading.Thread(target=self._read, args=(ours,), name="forkserver", daemon=True).start()
        return ours

    def _read(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._gone = True
                    self._cond.notify_all()
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                doc = json.loads(line)
                with self._cond:
                    if "pid" in doc:
                        self._pids.append(doc["pid"])
                    else:
                        self._exits[doc["exit"]] = doc["code"]
                    self._cond.notify_all()

    def spawn(self, name: str, argv: list[str], log_path: str, env: dict[str, str] | None = None) -> Child:
        prefix = ctops_argv()
        if argv[:len(prefix)] != prefix:  # not a ctops command: exec it as usual
            return spawn(name, argv, log_path, env)
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        req = {"args": argv[len(prefix):], "log": log_path, "env": {**os.environ, **(env or {})}}
        with self._lock:  # one request at a time, so the answer read next is this one's
            if self._sock is None:
                self._sock = self._start()
            with self._cond:
                self._pids.clear()
            _send(self._sock, req)
            with self._cond:
                if not self._cond.wait_for(lambda: self._pids or self._gone, 60) or not self._pids:
                    raise RuntimeError("the fork server did not start the process (see the test log)")
                pid = self._pids.pop()
        return Child(name, ForkedProc(self, pid, argv), log_path)

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            if pid in self._exits:
                return self._exits[pid]
            if self._gone and not pid_alive(pid):  # nobody left to report it: gone is all we know
                return -1
            return None

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.exit_code(pid)
            if code is not None:
                return code
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            with self._cond:
                self._cond.wait(0.1 if left is None else min(left, 0.1))

    def close(self) -> None:
        """The server sees its socket close and exits; children still running get SIGTERM then."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reading thread too, unlike close()
            self._sock.close()
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))

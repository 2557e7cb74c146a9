"""Starting a supervised process with a listening socket the agent owns (systemd's LISTEN_FDS
protocol), and, for a warm spare, a handover channel (see ctops/listenfds.py for the other side).

The socket must arrive as fd 3 with LISTEN_PID naming the child itself, which only the child knows:
a POSIX shell moves the socket from stdin to fd 3, sets LISTEN_PID to its own pid and execs the
command (same pid). No preexec_fn: the agent has threads, and forking them into Python is unsafe.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import IO

from ctops.config import split_hostport
from ctops.listenfds import GO, HANDOVER_FD_ENV, READY

__all__ = ["GO", "READY", "Launch", "bind", "launch"]

_SHELL = 'exec 3<&0 0</dev/null; LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


def bind(address: str) -> socket.socket:
    host, port = split_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Launch:
    proc: subprocess.Popen[bytes]
    handover: socket.socket | None  # the agent's end of a spare's channel


def _check_executable(command: list[str], cwd: str | None, path: str | None) -> None:
    """The shell would only say "not found" in the log and exit 127; say it here as Popen would."""
    exe = command[0]
    found = os.access(os.path.join(cwd or ".", exe), os.X_OK) if "/" in exe else shutil.which(exe, path=path)
    if not found:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), exe)


def launch(command: list[str], env: dict[str, str], cwd: str | None, out: int | IO[bytes], name: str,
           listener: socket.socket | None, spare: bool) -> Launch:
    """Start `command` in its own session; with `listener` it gets the socket as fd 3, and as a spare
    also a handover channel it must wait on before accepting."""
    if listener is None:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, start_new_session=True)
        return Launch(proc, None)
    _check_executable(command, cwd, env.get("PATH"))
    env = {**env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": name}
    ours: socket.socket | None = None
    theirs_fd: int | None = None
    pass_fds: tuple[int, ...] = ()
    if spare:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # above 9, clear of the shell's fd 3 (and of dash's single-digit redirections)
        theirs_fd = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        theirs.close()
        env[HANDOVER_FD_ENV] = str(theirs_fd)
        pass_fds = (theirs_fd,)
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", _SHELL, name, *command], env=env, cwd=cwd,
                                stdin=listener.fileno(), stdout=out, stderr=out,
                                start_new_session=True, pass_fds=pass_fds)
    except BaseException:
        if ours is not None:
            ours.close()
        raise
    finally:
        if theirs_fd is not None:
            os.close(theirs_fd)
    if ours is not None:
        ours.setblocking(False)
    return Launch(proc, ours)

"""Keeping learner code off the network and out of the host's shared directories.

Two ways to keep it off the network, the first that works on this machine being used:
- namespace: the run has its own network namespace, whose only interface is a loopback that is down,
  so no address of the host (nor any other) can be reached;
- seccomp: socket() and io_uring_setup() fail with EPERM (a seccomp filter), so no socket can be made.

And for files, a private mount and IPC namespace: /tmp, /var/tmp and /dev/shm are fresh tmpfs mounts
that vanish with the run's last process, as do System V IPC objects. Without namespaces, a root
server deletes what the run's uid left at the top of those directories (sweep_files).

The functions that confine run in the forked child before exec. This file needs only the standard
library, so that the sandbox's Python can run it as a script to probe what works:
`python3 -I -S confine.py namespaces|seccomp` (see probe()).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
PROBE_TIMEOUT = 30

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# classic BPF for seccomp: the instructions and the offsets in struct seccomp_data
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06
DATA_NR, DATA_ARCH = 0, 4
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
RET_KILL_PROCESS = 0x80000000
X32_SYSCALL_BIT = 0x40000000
# machine -> (AUDIT_ARCH_*, syscalls refused, has the x32 ABI whose numbers must be refused too)
ARCHES = {
    "x86_64": (0xC000003E, {"socket": 41, "io_uring_setup": 425}, True),
    "aarch64": (0xC00000B7, {"socket": 198, "io_uring_setup": 425}, False),
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def enter_namespaces(network: bool, files: bool, tmpfs_bytes: int) -> None:
    """Move the calling (single-threaded, root) process into new namespaces: a network namespace,
    and/or a mount and IPC namespace with fresh tmpfs on the shared writable directories."""
    flags = (CLONE_NEWNET if network else 0) | (CLONE_NEWNS | CLONE_NEWIPC if files else 0)
    _check(_libc.unshare(flags), "unshare")
    if not files:
        return
    # without this, the mounts below could propagate back to the host's mount namespace
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    options = f"size={tmpfs_bytes},mode=1777".encode()
    for d in SHARED_DIRS:
        if os.path.isdir(d):
            _check(_libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), f"mounting tmpfs on {d}")


def _socket_filter() -> bytes:
    arch, calls, x32 = ARCHES[platform.machine()]
    checks = [(BPF_JGE_K, X32_SYSCALL_BIT)] if x32 else []
    checks += [(BPF_JEQ_K, nr) for nr in calls.values()]
    n = len(checks)
    # layout: 0 load arch, 1 arch check, 2 load nr, 3.. checks, allow, refuse, kill
    refuse, kill = 4 + n, 5 + n
    prog = [(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
            (BPF_JEQ_K, 0, kill - 2, arch),  # a foreign ABI (e.g. i386 on x86_64) has other numbers
            (BPF_LD_W_ABS, 0, 0, DATA_NR)]
    prog += [(code, refuse - (3 + i) - 1, 0, k) for i, (code, k) in enumerate(checks)]
    prog += [(BPF_RET_K, 0, 0, RET_ALLOW), (BPF_RET_K, 0, 0, RET_ERRNO | errno.EPERM),
             (BPF_RET_K, 0, 0, RET_KILL_PROCESS)]
    assert len(prog) == kill + 1
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def refuse_sockets() -> None:
    """From now on, in this process and all it starts, creating a socket fails with EPERM."""
    code = _socket_filter()
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp filter")


def seccomp_supported() -> str | None:
    """None when this machine's architecture has a filter here; else why not."""
    if platform.machine() not in ARCHES:
        return f"no seccomp filter for the {platform.machine()} architecture"
    return None


def sweep_files(uid: int) -> None:
    """Delete what a run's uid left at the top of the shared writable directories (the fallback when
    there are no mount namespaces; deeper leftovers need a directory the uid could write to)."""
    for d in SHARED_DIRS:
        with contextlib.suppress(OSError), os.scandir(d) as entries:
            for e in entries:
                with contextlib.suppress(OSError):
                    if e.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if e.is_dir(follow_symlinks=False):
                        shutil.rmtree(e.path, ignore_errors=True)
                    else:
                        os.unlink(e.path)


def probe(python: str, what: str) -> str | None:
    """Run this file as a script with the sandbox's Python to see whether `what` ("namespaces" or
    "seccomp") works here: None when it does, else why not."""
    try:
        r = subprocess.run([python, "-I", "-S", "-B", __file__, what], capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT, env={"PATH": "/usr/bin:/bin"}, cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"probe failed: {exc}"
    if r.returncode == 0 and r.stdout.strip() == "ok":
        return None
    return (r.stdout.strip() or r.stderr.strip() or f"exit status {r.returncode}").splitlines()[-1][:300]


def _probe_main(what: str) -> str:
    if what == "namespaces":
        before = os.readlink("/proc/self/ns/net")
        try:
            enter_namespaces(network=True, files=True, tmpfs_bytes=1 << 20)
        except OSError as exc:
            return str(exc)
        if os.readlink("/proc/self/ns/net") == before or any(Path("/tmp").iterdir()):
            return "the namespaces did not take effect"
        return "ok"
    if what == "seccomp":
        if (why := seccomp_supported()) is not None:
            return why
        try:
            refuse_sockets()
        except OSError as exc:
            return str(exc)
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        except PermissionError:
            return "ok"
        return "a socket could still be made under the filter"
    return f"unknown probe {what!r}"


if __name__ == "__main__":
    print(_probe_main(sys.argv[1]))

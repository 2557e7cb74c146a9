"""Under systemd the agent says READY=1 and keeps sending WATCHDOG=1 over $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from ctops_tools.procs import Child, stop_all


def test_agent_notifies_systemd(tmp_path, make_cluster) -> None:
    c = make_cluster(trainers=1)
    c.start("A")
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(10)
    env = {**os.environ, **c.env, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "ctops_tools.cli", "agent", "--config", str(c.config),
                             "--name", "host-1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and got.count(b"WATCHDOG=1") < 3:
            got.append(sock.recv(1024))
        assert b"READY=1" in got
        assert got.count(b"WATCHDOG=1") >= 3
    finally:
        stop_all([Child("agent", proc, "")])
        sock.close()

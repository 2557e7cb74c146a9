"""A stopped local cluster leaves nothing of its own running: processes its agents started run in
sessions of their own (as in production) and outlive an agent killed after its grace; the teardown
finds them by the cluster directory on their command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ctops_tools.procs import kill_naming


def test_processes_naming_the_cluster_directory_are_killed_and_others_left(tmp_path: Path) -> None:
    ours = tmp_path / "c0"
    other = tmp_path / "c01"  # a sibling whose name starts the same is not the cluster's
    sleep = "import time, sys; time.sleep(120)"
    mine = subprocess.Popen([sys.executable, "-c", sleep, "--config", f"{ours}/ctops.toml"], start_new_session=True)
    theirs = subprocess.Popen([sys.executable, "-c", sleep, "--config", f"{other}/ctops.toml"],
                              start_new_session=True)
    try:
        killed = kill_naming(f"{ours}/")
        assert mine.wait(30) == -9 and killed == [mine.pid]
        assert theirs.poll() is None
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait()

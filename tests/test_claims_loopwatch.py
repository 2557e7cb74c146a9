"""README claims about the dispatcher's loop watch (dispatcher/loopwatch.py): a watched loop that
stops counting its rounds (the lease and Redis-sync loops as much as the health loop, whose stall
tests/test_loopwatch.py shows in a real dispatcher) is cancelled, started again and reported; and a
blocked event loop makes the process exit, in a real process, so its supervisor starts it again."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctops_tools.procs import ctops_argv
from dispatcher.loopwatch import EXIT_BLOCKED, LoopWatch


async def test_a_stalled_lease_or_sync_loop_is_restarted_and_reported() -> None:
    restarted: list[str] = []
    rounds = {"lease": 0, "sync": 0}
    starts = {"lease": 0, "sync": 0}

    def loop(name: str, stall_after_rounds: int):
        async def run() -> None:
            starts[name] += 1
            first = starts[name] == 1
            while True:
                if first and rounds[name] >= stall_after_rounds:
                    await asyncio.Event().wait()  # stuck for good, as a bug could leave it
                rounds[name] += 1
                await asyncio.sleep(0.02)
        return run

    watch = LoopWatch(lambda name, _s: restarted.append(name), blocked_exit_after=600)
    watch.start("lease", loop("lease", 5), lambda: rounds["lease"], stall_after=0.5)
    watch.start("sync", loop("sync", 10), lambda: rounds["sync"], stall_after=0.5)
    runner = asyncio.create_task(watch.run())
    try:
        for _ in range(600):  # up to a minute
            if {"lease", "sync"} <= set(restarted) and rounds["lease"] > 20 and rounds["sync"] > 20:
                break
            await asyncio.sleep(0.1)
        assert sorted(restarted) == ["lease", "sync"], restarted  # each once: the restarted loops run on
        assert starts == {"lease": 2, "sync": 2}
        assert rounds["lease"] > 20 and rounds["sync"] > 20  # counting again after the restart
    finally:
        runner.cancel()
        watch.stop()


BLOCKER = f"""
import asyncio, logging, sys, time
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parent.parent)!r})
from dispatcher.loopwatch import LoopWatch
logging.basicConfig(level=logging.INFO)

async def main():
    watch = LoopWatch(lambda *a: None, blocked_exit_after=1.0)
    asyncio.get_running_loop().create_task(watch.run())
    await asyncio.sleep(0.5)
    print("blocking", flush=True)
    time.sleep(120)  # a blocking call on the event loop: nothing inside the loop can help
    print("still here", flush=True)

asyncio.run(main())
"""


def test_a_blocked_event_loop_makes_the_process_exit() -> None:
    p = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=100)
    assert p.returncode == EXIT_BLOCKED, (p.returncode, p.stdout, p.stderr)
    assert "blocking" in p.stdout and "still here" not in p.stdout
    assert "event loop blocked" in p.stderr


IDLE_LOOP = f"""
import asyncio, logging, sys
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parent.parent)!r})
from dispatcher.loopwatch import LoopWatch
logging.basicConfig(level=logging.INFO)

async def main():
    watch = LoopWatch(lambda *a: None, blocked_exit_after=1.0)
    asyncio.get_running_loop().create_task(watch.run())
    print("idle", flush=True)
    while True:
        await asyncio.sleep(0.1)

asyncio.run(main())
"""


def test_chaos_block_stops_the_event_loop_and_the_guard_exits(tmp_path: Path) -> None:
    """`ctops chaos block NAME` (a tracer that is not the process's parent) stops only the main
    thread; the guard thread, running on, sees the loop silent and exits the process."""
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    if scope.exists() and scope.read_text().strip() != "0" and os.geteuid() != 0:
        pytest.skip(f"kernel.yama.ptrace_scope is {scope.read_text().strip()}: only a parent may ptrace")
    toy = subprocess.Popen([sys.executable, "-c", IDLE_LOOP], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert toy.stdout is not None and toy.stdout.readline() == "idle\n"
        state = tmp_path / "state.json"
        state.write_text(json.dumps({"dispatchers": [{"name": "toy", "pid": toy.pid}]}))
        chaos = subprocess.run(ctops_argv("chaos", "block", "toy", "--state-file", str(state), "--seconds", "100"),
                               capture_output=True, text=True, timeout=150)
        assert chaos.returncode == 0, chaos.stderr
        assert "toy exited while its event loop was blocked" in chaos.stdout
        assert toy.wait(timeout=60) == EXIT_BLOCKED
        assert "event loop blocked" in (toy.stderr.read() if toy.stderr else "")
    finally:
        toy.kill()
        toy.wait()

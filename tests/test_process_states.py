"""A supervised process's state changes go through one place (`Supervised.change_state`): each is
logged for staff reading the agent's log, and a change no code path should make is refused."""

from __future__ import annotations

import logging
import sys
from typing import get_args

import pytest

from agents.states import MOVES, IllegalMove
from agents.supervisor import Supervised, Supervisor
from ctops.config import ProcessSpec
from ctops.wire import ProcessState
from tests.cluster import wait_for


def test_every_state_the_wire_knows_has_its_moves() -> None:
    assert set(MOVES) == set(get_args(ProcessState))
    assert all(to <= set(get_args(ProcessState)) for to in MOVES.values())


def test_an_illegal_change_is_refused_and_the_state_kept() -> None:
    item = Supervised(ProcessSpec(name="web", command=["true"]))
    item.change_state("backoff")
    item.change_state("fatal", "crash loop")
    with pytest.raises(IllegalMove, match="web: fatal -> running"):
        item.change_state("running")
    assert item.state == "fatal"
    item.change_state("stopped", "started by staff")  # staff start from fatal begins at stopped
    assert item.state == "stopped"


def test_a_crash_loop_logs_each_state_change(caplog: pytest.LogCaptureFixture) -> None:
    spec = ProcessSpec(name="bad", command=[sys.executable, "-c", "import sys; sys.exit(3)"],
                       backoff_initial_ms=20, backoff_max_ms=40, crashloop_restarts=2, crashloop_window_ms=60_000)
    caplog.set_level(logging.INFO, logger="ctops.agent.watchdog")
    sup = Supervisor([spec])
    sup.start()
    try:
        wait_for("fatal", lambda: sup.snapshot()[0][0]["state"] == "fatal")
        moves = [r.getMessage().split(" (")[0] for r in caplog.records if r.getMessage().startswith("bad: ")]
    finally:
        sup.stop()
    assert moves[0] == "bad: stopped -> running"  # no liveness probe: running once started
    assert "bad: running -> backoff" in moves and "bad: backoff -> running" in moves
    assert moves[-1] == "bad: running -> fatal"

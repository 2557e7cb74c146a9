"""A supervised process's states and the moves between them, as supervisord's `states.py`.

The watchdog changes a process's state only through `Supervised.change_state`, which checks the
move against `MOVES`, logs it, and refuses one that is not there: a state no code path should reach
shows up as an error at once instead of as a process staff see stuck in a state that makes no sense.

    stopped --spawn--> starting --probe ok--> running          (running at once without a probe)
       ^                  |                     |
       |                  +----- exit --------->+--> backoff --spawn--> starting | running
       +--- staff stop / exit not restarted ----+        |
                                                         +--> fatal (crash loop) --staff--> stopped
"""

from __future__ import annotations

from typing import Final

from ctops.wire import ProcessState

STOPPED: Final[ProcessState] = "stopped"
STARTING: Final[ProcessState] = "starting"  # started; its liveness probe has not answered yet
RUNNING: Final[ProcessState] = "running"
BACKOFF: Final[ProcessState] = "backoff"  # exited; starts again at its next_start
FATAL: Final[ProcessState] = "fatal"  # restarted too often in its window; only staff start it again

# where a process may go from each state (staying where it is, e.g. another failed start while in
# backoff, is no move at all)
MOVES: Final[dict[ProcessState, frozenset[ProcessState]]] = {
    STOPPED: frozenset({STARTING, RUNNING, BACKOFF, FATAL}),  # spawned, or could not be spawned
    STARTING: frozenset({RUNNING, STOPPED, BACKOFF, FATAL}),
    RUNNING: frozenset({STOPPED, BACKOFF, FATAL}),
    BACKOFF: frozenset({STARTING, RUNNING, STOPPED, FATAL}),
    FATAL: frozenset({STOPPED}),  # a staff start, stop or restart begins from stopped
}


class IllegalMove(RuntimeError):
    """A state change no code path should make; the state stays as it was."""


def check_move(name: str, old: ProcessState, new: ProcessState) -> None:
    if new != old and new not in MOVES[old]:
        raise IllegalMove(f"{name}: {old} -> {new} is not a legal state change")

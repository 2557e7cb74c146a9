"""Undo for reversible staff actions: each done action that has an inverse leaves one entry here; `U`
(or `:undo`) runs the inverse of the newest through the tab that owns it, so it asks first with the
current state and capacity, like any action, and is audited like any action.

What has an inverse: a server's drain / disable / enable (back to its admin state before), an LLM
provider's pin / unpin / disable / enable, a supervised process's stop / start. A restart, a
promotion, a store failover and a quarantine discard have none.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ctops.opsapi import ADMIN_FOR

if TYPE_CHECKING:
    from console.app import ConsoleApp

KEEP = 20


@dataclass(frozen=True, slots=True)
class Undoable:
    tab: str  # the tab whose action undoes it
    target: str  # row key on that tab: server name, provider name, "host/process"
    action: str  # the inverse action
    done: str  # what was done, for the question: "disable trainer-3"


class UndoLog:
    def __init__(self) -> None:
        self.entries: deque[Undoable] = deque(maxlen=KEEP)

    def push(self, entry: Undoable | None) -> None:
        if entry is not None:
            self.entries.append(entry)

    def pop(self) -> Undoable | None:
        return self.entries.pop() if self.entries else None


def server_inverse(action: str, name: str, admin_before: str) -> Undoable | None:
    back = next((a for a, admin in ADMIN_FOR.items() if admin == admin_before), None)
    if back is None or back == action:
        return None  # nothing changed (enable on an enabled server)
    return Undoable("servers", name, back, f"{action} {name}")


def provider_inverse(action: str, name: str, pinned_before: bool, disabled_before: bool) -> Undoable | None:
    back = {
        "pin": None if pinned_before else "unpin",
        "unpin": "pin" if pinned_before else None,
        "disable": None if disabled_before else "enable",
        "enable": "disable" if disabled_before else None,
    }.get(action)
    return None if back is None else Undoable("llm", name, back, f"{action} provider {name}")


def process_inverse(action: str, key: str, state_before: str) -> Undoable | None:
    back = {"stop": "start" if state_before == "running" else None,
            "start": "stop" if state_before in ("stopped", "fatal", "exited") else None}.get(action)
    return None if back is None else Undoable("hosts", key, back, f"{action} {key}")


# the action method of each tab that takes (action, target, undo=True)
_TAB_ACTION = {"servers": "action_server", "hosts": "action_process", "llm": "action_provider"}


def run_undo(app: ConsoleApp) -> None:
    entry = app.undo_log.pop()
    if entry is None:
        app.notice("information", "Nothing to undo",
                   "No reversible action of yours in this session (drain, disable, enable, pin, stop, start).")
        return
    app.action_show_tab(entry.tab)
    # the confirmation that follows is the action's own (current state, capacity): this says why it comes
    app.notice("information", "Undo", f"Undoing your {entry.done}: confirm to {entry.action} {entry.target}.")
    getattr(app.tab(entry.tab), _TAB_ACTION[entry.tab])(entry.action, entry.target, undo=True)

"""The one command table: key bindings, the footer, the help screen and the command palette all come from it.

A command with a `tab` is bound on that tab's widget (console/tabs.py), which owns its action, so a key
acts only where its rows are shown; the others are bound on the app.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from textual.binding import Binding, BindingType

from ctops.opsapi import ACTION_GRANT, role_may

# the tabs, in order; their keys are 1..6
TABS: tuple[tuple[str, str], ...] = (
    ("servers", "Servers"),
    ("hosts", "Hosts"),
    ("events", "Events"),
    ("dispatchers", "Dispatchers"),
    ("llm", "LLM"),
    ("store", "Store"),
)
TAB_TITLES = dict(TABS)
TABLE = "table"  # a command with this `tab` is bound on every live table (console/widgets/live_table.py)
TAB_TITLES[TABLE] = "any table"


@dataclass(frozen=True, slots=True)
class Command:
    id: str  # binding id: a keymap maps this to another key
    key: str
    action: str  # action of the tab widget (or the app), without "action_" (may carry parameters)
    title: str  # footer label and palette title
    help: str
    footer: bool = True
    palette: bool = True
    tab: str | None = None  # only active on this tab (hidden from the footer elsewhere)
    grant: str | None = None  # what the token's role must allow (default: see `needs`)

    @property
    def needs(self) -> str:
        """The grant a role needs to see and run it; a role without it never sees the command."""
        return self.grant or (ACTION_GRANT if self.id in ACTING else "read")

    def binding(self) -> Binding:
        return Binding(self.key, self.action, self.title, show=self.footer, id=self.id)

    def key_in(self, keymap: Mapping[str, str]) -> str:
        return keymap.get(self.id, self.key)


def _tab(i: int, name: str, title: str) -> Command:
    return Command(f"console.tab.{name}", str(i), f"show_tab('{name}')", title, f"Show the {title} tab.",
                   footer=False)


COMMANDS: tuple[Command, ...] = (
    *(_tab(i, name, title) for i, (name, title) in enumerate(TABS, start=1)),
    # servers
    Command("console.drain", "d", "server('drain')", "Drain",
            "Drain the selected server: no new sessions; active sessions finish there.", tab="servers"),
    Command("console.disable", "x", "server('disable')", "Disable",
            "Disable the selected server: take it out of rotation now; sessions move to other servers.",
            tab="servers"),
    Command("console.enable", "e", "server('enable')", "Enable",
            "Enable the selected server: put it back into rotation.", tab="servers"),
    # supervised processes
    Command("console.process.restart", "R", "process('restart')", "Restart",
            "Restart the selected supervised process on its host (through its agent).", tab="hosts"),
    Command("console.process.stop", "S", "process('stop')", "Stop",
            "Stop the selected supervised process; the agent leaves it stopped until started.", tab="hosts"),
    Command("console.process.start", "T", "process('start')", "Start",
            "Start the selected (stopped or fatal) supervised process again.", tab="hosts"),
    # dispatchers
    Command("console.dispatcher.promote", "P", "leadership('promote')", "Promote",
            "Make the selected standby dispatcher the leader; the leader steps down.", tab="dispatchers"),
    Command("console.dispatcher.step_down", "D", "leadership('step-down')", "Step down",
            "The leading dispatcher stops leading; a standby takes over.", tab="dispatchers"),
    # LLM providers
    Command("console.llm.pin", "i", "provider('pin')", "Pin",
            "Pin the selected LLM provider: requests go to it first, whatever the priorities.", tab="llm"),
    Command("console.llm.unpin", "u", "provider('unpin')", "Unpin",
            "Unpin: requests go by priority and health again.", tab="llm"),
    Command("console.llm.disable", "x", "provider('disable')", "Disable",
            "Disable the selected LLM provider: it gets no requests until enabled.", tab="llm"),
    Command("console.llm.enable", "e", "provider('enable')", "Enable",
            "Enable the selected LLM provider again.", tab="llm"),
    # the shared store
    Command("console.store.failover", "F", "failover", "Fail over",
            "Fail the store over now: the Sentinels promote a replica to primary (SENTINEL FAILOVER).",
            tab="store"),
    Command("console.store.discard", "X", "quarantine('discard')", "Discard",
            "Discard the selected quarantined record: its damaged bytes are deleted for good.", tab="store"),
    Command("console.store.restore", "R", "quarantine('restore')", "Restore",
            "Put the selected quarantined record's bytes back at its key (to examine it, or when the check "
            "was wrong).", tab="store"),
    # everywhere
    Command("console.exceptions", "E", "exceptions", "Exceptions",
            "Open exceptions triage: groups, tracebacks, ack / resolve / mute / assign, live tail.", footer=False),
    Command("console.notices", "N", "notices", "Notices",
            "Show every notice the console gave (actions, leader changes, critical events), newest first.",
            footer=False),
    Command("console.refresh", "r", "refresh_now", "Refresh", "Fetch the cluster state now."),
    Command("console.pause", "p", "toggle_pause", "Pause",
            "Pause or resume the live refresh (the tables stay as they are)."),
    # views and navigation, as k9s and htop users expect them
    Command("console.cmdline", "colon", "cmdline", "Command line",
            "Type a view or action by name (servers, hosts, audit, exceptions, drain, undo, ...), Tab completes.",
            footer=False, palette=False),
    Command("console.audit", "A", "audit", "Audit log",
            "Show the audit log: who did what to which target, when, and the answer.", footer=False),
    Command("console.undo", "U", "undo", "Undo",
            "Undo your last reversible action (drain, disable, enable, pin, unpin, stop, start): asks first.",
            footer=False),
    Command("console.table.describe", "enter", "select_cursor", "Describe",
            "Describe the selected row: every field, its errors with their ages, its recent events and audit "
            "entries.", footer=False, palette=False, tab=TABLE),
    Command("console.table.filter", "slash", "filter", "Filter",
            "Filter the table as you type (every word must match); Enter keeps the filter, Esc clears it.",
            footer=False, tab=TABLE),
    Command("console.table.faults", "f", "toggle_faults", "Faults only",
            "Show only rows with a fault (down, suspect, lost, crashed, ...), or every row again.",
            footer=False, tab=TABLE),
    Command("console.table.sort", "o", "sort_next", "Sort",
            "Sort by the next column to the right (after the last column: by name again).", footer=False,
            tab=TABLE),
    Command("console.table.reverse", "O", "sort_reverse", "Reverse sort", "Reverse the sort order.",
            footer=False, tab=TABLE),
    Command("console.table.down", "j", "cursor_down", "Down", "Move the cursor down a row.", footer=False,
            palette=False, tab=TABLE),
    Command("console.table.up", "k", "cursor_up", "Up", "Move the cursor up a row.", footer=False,
            palette=False, tab=TABLE),
    Command("console.table.top", "g", "scroll_top", "Top", "Move the cursor to the first row.", footer=False,
            palette=False, tab=TABLE),
    Command("console.table.bottom", "G", "scroll_bottom", "Bottom", "Move the cursor to the last row.",
            footer=False, palette=False, tab=TABLE),
    Command("console.help", "question_mark", "help", "Help", "Show this help.", palette=False),
    Command("console.quit", "q", "quit", "Quit", "Leave the console.", palette=False),
)



# the commands that change something (each is audited): only a role with the `act` grant sees them
ACTING: frozenset[str] = frozenset({
    "console.drain", "console.disable", "console.enable",
    "console.process.restart", "console.process.stop", "console.process.start",
    "console.dispatcher.promote", "console.dispatcher.step_down",
    "console.llm.pin", "console.llm.unpin", "console.llm.disable", "console.llm.enable",
    "console.store.failover", "console.store.discard", "console.store.restore",
    "console.undo",  # it runs the inverse action
})


def bindings(tab: str | None = None) -> list[BindingType]:
    """The bindings of one tab's widget, or (None) the app's own."""
    return [c.binding() for c in COMMANDS if c.tab == tab]


def commands(tab: str | None = None) -> list[Command]:
    return [c for c in COMMANDS if c.tab == tab]


def allowed(c: Command, role: str | None) -> bool:
    """Whether a token of this role may run the command; an unknown role (whoami not answered yet,
    or an older dispatcher) is not narrowed: the ops API still refuses what the token may not do."""
    return role is None or role_may(role, c.needs)


def permitted(role: str | None, action: str, tab: str | None = None) -> bool:
    """For Textual's check_action: `action` is the name without parameters ("server", "failover")."""
    return all(allowed(c, role) for c in COMMANDS if c.tab == tab and c.action.split("(")[0] == action)


def display_key(key: str) -> str:
    """Keys as the help screen shows them ("question_mark" -> "?", "R" -> "shift+r")."""
    names = {"question_mark": "?", "escape": "Esc", "enter": "Enter", "space": "Space", "slash": "/",
             "colon": ":", "asterisk": "*"}

    def one(k: str) -> str:
        k = k.strip()
        if len(k) == 1 and k.isupper():
            return f"{k} (shift+{k.lower()})"
        return names.get(k, k)

    return ", ".join(one(k) for k in key.split(","))

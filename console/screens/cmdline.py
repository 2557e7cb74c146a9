"""The one-line prompt at the bottom: `/` filters the focused table as you type, `:` reaches any view or
action by name (k9s's way: `:hosts`, `:audit`, `:drain`, `:servers down`). Names come from the command
table (console/commands.py), so the prompt, the palette, the keys and the help cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Input, Label

from console.commands import COMMANDS, TAB_TITLES, TABLE, TABS, Command, allowed
from console.widgets.live_table import LiveTable

if TYPE_CHECKING:
    from console.app import ConsoleApp


class Prompt(ModalScreen[str | None]):
    """A one-line input over the bottom line; the screen below stays visible and live."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False, id="prompt.cancel"),
                Binding("tab", "complete", "Complete", show=False, priority=True, id="prompt.complete")]
    DEFAULT_CSS = """
    Prompt { background: transparent; align: left bottom; }
    Prompt > #prompt-line { height: 1; width: 100%; background: $panel; dock: bottom; }
    Prompt #prompt-sign { width: 2; padding: 0 0 0 1; color: $accent; text-style: bold; }
    Prompt #prompt-input { width: 1fr; }
    """

    def __init__(self, sign: str, value: str = "", *, placeholder: str = "",
                 on_change: Callable[[str], None] | None = None, names: list[str] | None = None) -> None:
        super().__init__()
        self.sign = sign
        self.value = value
        self.placeholder = placeholder
        self.on_change = on_change
        self.names = names

    def compose(self) -> ComposeResult:
        with Horizontal(id="prompt-line"):
            yield Label(self.sign, id="prompt-sign")
            suggester = SuggestFromList(self.names, case_sensitive=False) if self.names else None
            yield Input(self.value, placeholder=self.placeholder, id="prompt-input", compact=True,
                        suggester=suggester)

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if self.on_change is not None:
            self.on_change(event.value)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_complete(self) -> None:
        box = self.query_one(Input)
        box.cursor_position = len(box.value)
        box.action_cursor_right()  # at the end, this takes the suggestion


# --- `/`: filter the focused table -------------------------------------------------------------

def open_filter(table: LiveTable) -> None:
    """Filter as you type; Enter keeps the filter, Esc clears it (k9s's way)."""

    def done(value: str | None) -> None:
        if value is None:
            table.set_view(words=[])
        table.focus()

    table.app.push_screen(Prompt("/", " ".join(table.filter_words), placeholder="filter: words that must all match",
                                 on_change=lambda text: table.set_view(words=text.split())), done)


# --- `:`: any view or action by name -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Target:
    command: Command
    tab: str | None  # the tab it acts on (None: the app; TABLE: the shown tab's table)
    words: tuple[str, ...] = ()  # after a view's name: a filter for its table


def command_name(c: Command) -> str:
    """`drain`, `step-down`, `faults-only`: what `:` takes for a command (a tab: its name)."""
    if c.id.startswith("console.tab."):
        return c.id.removeprefix("console.tab.")
    return c.title.lower().replace(" ", "-")


def names() -> list[str]:
    """Every name `:` knows, for completion: the views first, then actions (qualified where two tabs
    share one, e.g. `llm disable`)."""
    out = [command_name(c) for c in COMMANDS if c.palette or c.id.startswith("console.tab.")]
    out += [f"{c.tab} {command_name(c)}" for c in COMMANDS if c.tab and c.tab != TABLE]
    out += ["help", "quit"]
    return list(dict.fromkeys(out))


def resolve(text: str, active_tab: str) -> Target | None:
    """What `:text` means. A tab's action is looked up on the shown tab first, then on any tab
    (`:disable` on the LLM tab disables a provider, elsewhere a server); `:llm disable` says which."""
    words = text.strip().lower().split()
    if not words:
        return None
    tabs = {name for name, _ in TABS}
    qualifier = None
    if len(words) >= 2 and words[0] in tabs:
        own = _find(words[1], words[0])
        if own is not None and own.tab == words[0]:  # `:llm disable`; `:servers down` filters instead
            qualifier, words = words[0], words[1:]
    name, rest = words[0], tuple(words[1:])
    if qualifier is None and name in tabs:
        return Target(next(c for c in COMMANDS if c.id == f"console.tab.{name}"), None, rest)
    found = _find(name, qualifier or active_tab)
    if found is None and qualifier is None:
        found = _find(name, None)
    if found is None:
        return None
    return Target(found, found.tab, rest)


def _find(name: str, tab: str | None) -> Command | None:
    fits = [c for c in COMMANDS if command_name(c) == name or c.id.rsplit(".", 1)[-1] == name]
    if tab is not None:
        on_tab = [c for c in fits if c.tab == tab]
        if on_tab:
            return on_tab[0]
        return next((c for c in fits if c.tab in (None, TABLE)), None)
    return fits[0] if fits else None


def run(app: ConsoleApp, target: Target) -> None:
    """Run a command where it belongs: a tab's action after showing that tab, a table's on the shown table."""
    c = target.command
    if target.tab is None:
        if target.words and c.id.startswith("console.tab."):
            _filter_tab(app, c.id.removeprefix("console.tab."), list(target.words))
        app.call_next(app.run_action, c.action)
        return
    if target.tab == TABLE:
        table = main_table(app)
        if table is not None:
            app.call_next(app.run_action, c.action, table)
        return
    tab = target.tab
    if app.active_tab != tab:
        app.action_show_tab(tab)
        # the tab catches up with its rows when shown: act once it has
        app.call_after_refresh(lambda: app.call_next(app.run_action, c.action, app.tab(tab)))
    else:
        app.call_next(app.run_action, c.action, app.tab(tab))


def _filter_tab(app: ConsoleApp, name: str, words: list[str]) -> None:
    table = next(iter(app.tab(name).query(LiveTable)), None)
    if table is not None:
        table.set_view(words=words)


def main_table(app: ConsoleApp) -> LiveTable | None:
    """The table `/`, `f` and `o` act on: the focused one, else the shown tab's first."""
    focused = app.main.focused
    if isinstance(focused, LiveTable):
        return focused
    return next((t for t in app.tab().query(LiveTable) if t.can_focus), None)


def open_cmdline(app: ConsoleApp) -> None:
    def done(value: str | None) -> None:
        if not value:
            return
        if value.strip() in ("help", "quit"):
            app.call_next(app.run_action, value.strip())
            return
        target = resolve(value, app.active_tab)
        if target is None:
            app.notice("warning", "No such command",
                       f"':{value}' names no view or action; Tab completes, ctrl+p lists them all.")
            return
        if not allowed(target.command, app.role):
            app.notice("warning", "Not for this role",
                       f"':{value}' changes the cluster; a {app.role} token may only look.")
            return
        run(app, target)

    app.push_screen(Prompt(":", placeholder="a view or action: servers, hosts, audit, drain, undo, ... "
                                            "(Tab completes)", names=names()), done)


# --- the palette: every command of every tab ---------------------------------------------------

def palette(app: ConsoleApp) -> Iterable[SystemCommand]:
    """The commands the app's own palette entries leave out: other tabs' actions and the table keys."""
    shown = app.active_tab
    for c in COMMANDS:
        if not c.palette or c.tab is None or c.tab == shown or not allowed(c, app.role):
            continue
        where = "the shown table" if c.tab == TABLE else TAB_TITLES[c.tab]
        yield SystemCommand(f"{c.title} ({where})", c.help, partial(run, app, Target(c, c.tab)))

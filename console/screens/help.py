"""`?`: every binding, from the same command table as the footer and the palette."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from console.commands import COMMANDS, TAB_TITLES, allowed, display_key
from console.format import DIAGNOSIS_STYLE, PROCESS_STYLE, STATE_STYLE
from ctops.opsapi import ACTION_GRANT, role_may


def help_table(keymap: Mapping[str, str], role: str | None = None) -> Table:
    t = Table(box=None, show_header=True, header_style="bold", expand=True, padding=(0, 2, 0, 0))
    t.add_column("Key", no_wrap=True)
    t.add_column("Action", no_wrap=True)
    t.add_column("Where", no_wrap=True)
    t.add_column("What it does")
    for c in COMMANDS:
        if not allowed(c, role):
            continue  # a viewer is not offered what its token may not do
        # the binding id is what console.toml's [keys] remaps
        t.add_row(display_key(c.key_in(keymap)), c.title, TAB_TITLES[c.tab] if c.tab else "anywhere",
                  f"{c.help} [dim]{c.id}[/dim]")
    t.add_row("↑ ↓ PgUp PgDn", "Move", "tables", "Select a row (actions apply to the selected row).")
    t.add_row("ctrl+p", "Palette", "anywhere", "Search and run any command of any tab (and the table keys).")
    return t


def legend() -> str:
    servers = "  ".join(f"[{style}]{glyph} {name}[/]" for name, (glyph, style) in STATE_STYLE.items())
    diagnoses = "  ".join(f"[{style}]{label}[/] = {name}" for name, (label, style) in DIAGNOSIS_STYLE.items()
                          if label and label != name)
    processes = "  ".join(f"[{style}]{glyph} {name}[/]" for name, (glyph, style) in PROCESS_STYLE.items())
    return (f"Servers: {servers}\nDiagnosis: [dim]blank[/] = ok  {diagnoses}\nProcesses: {processes}\n"
            "Every action asks for confirmation first and is written to the audit log.")


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close", id="help.close")]

    def __init__(self, keymap: Mapping[str, str], role: str | None = None) -> None:
        super().__init__()
        self.keymap = keymap
        self.role = role

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Static("[b]ctops console — keys[/b]", id="help-title")
            yield Static(help_table(self.keymap, self.role), id="help-keys")
            if self.role is not None and not role_may(self.role, ACTION_GRANT):
                yield Static(f"[yellow]Your token's role is {self.role}: it reads everything and changes "
                             "nothing, so no actions are listed. An operator token acts.[/yellow]",
                             id="help-role")
            yield Static(legend(), id="help-legend")
            yield Static("[dim]Esc or ? closes this help.[/dim]")

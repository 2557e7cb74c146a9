"""The one command table: key bindings, the footer, the help screen and the command palette all come from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True, slots=True)
class Command:
    id: str  # binding id: a keymap maps this to another key
    key: str
    action: str  # app action name, without "action_"
    title: str  # footer label and palette title
    help: str
    footer: bool = True
    palette: bool = True

    def binding(self) -> Binding:
        return Binding(self.key, self.action, self.title, show=self.footer, id=self.id)

    def key_in(self, keymap: Mapping[str, str]) -> str:
        return keymap.get(self.id, self.key)


COMMANDS: tuple[Command, ...] = (
    Command("console.drain", "d", "drain", "Drain",
            "Drain the selected server: no new sessions; active sessions finish there."),
    Command("console.disable", "x", "disable", "Disable",
            "Disable the selected server: take it out of rotation now; sessions move to other servers."),
    Command("console.enable", "e", "enable", "Enable",
            "Enable the selected server: put it back into rotation."),
    Command("console.refresh", "r", "refresh_now", "Refresh", "Fetch the cluster state now."),
    Command("console.pause", "p", "toggle_pause", "Pause",
            "Pause or resume the live refresh (the table stays as it is)."),
    Command("console.help", "question_mark", "help", "Help", "Show this help.", palette=False),
    Command("console.quit", "q", "quit", "Quit", "Leave the console.", palette=False),
)

# actions that change a server; each asks for confirmation first
SERVER_ACTIONS: tuple[str, ...] = ("drain", "disable", "enable")


def bindings() -> list[Binding]:
    return [c.binding() for c in COMMANDS]


def display_key(key: str) -> str:
    """Keys as the help screen shows them ("question_mark" -> "?")."""
    names = {"question_mark": "?", "escape": "Esc", "enter": "Enter", "space": "Space"}
    return ", ".join(names.get(k.strip(), k.strip()) for k in key.split(","))

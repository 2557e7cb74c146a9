"""Asks before anything changes, saying what will happen. Cancel has the focus, so a stray Enter changes nothing."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from ctops.wire import ServerView

_EFFECT = {
    "drain": "New sessions go to other servers; its {n} active session(s) finish there.",
    "disable": "It leaves rotation now; its {n} active session(s) move to other servers.",
    "enable": "It goes back into rotation and receives new sessions.",
}


class ConfirmAction(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str, detail: str, verb: str) -> None:
        super().__init__()
        self.question = question
        self.detail = detail
        self.verb = verb

    @classmethod
    def for_server(cls, action: str, s: ServerView) -> ConfirmAction:
        return cls(f"{action.capitalize()} [b]{s.name}[/b]?",
                   f"Now {s.state} (admin {s.admin}) on {s.host}.\n" + _EFFECT[action].format(n=s.active_sessions),
                   action.capitalize())

    def compose(self) -> ComposeResult:
        with Grid(id="confirm-box"):
            yield Label(self.question, id="confirm-question")
            yield Label(self.detail, id="confirm-detail")
            with Horizontal(id="confirm-buttons"):
                yield Button(f"{self.verb} (y)", variant="warning", id="yes")
                yield Button("Cancel (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

"""The one confirm-then-act flow: every action a staff member takes from the console (servers, processes,
leadership, LLM providers, the store, quarantined records, exception groups) is an `Ask`: a question
that says what will happen, an optional value to type, and the call to make once answered yes.

The dialog gives Cancel (or the input) the focus, so a stray Enter changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from console.messages import ActionDone
from ctops.wire import ServerView


@dataclass(frozen=True, slots=True)
class Field:
    """A value the action needs (minutes to mute, a name to assign); `check` returns what is wrong, or None."""

    value: str
    placeholder: str
    kind: str = "text"  # Input type: "text" or "integer"
    max_length: int = 64
    check: Callable[[str], str | None] | None = None


@dataclass(frozen=True, slots=True)
class Ask:
    question: str  # markup
    detail: str
    verb: str  # the yes button
    action: str  # for the failure text: "Could not <action> <target>"
    target: str
    what: str  # the kind of thing acted on, for a 403/404 ("servers", "LLM providers", ...)
    call: Callable[[str], Awaitable[ActionDone]]  # given the typed value ("" without a field)
    field: Field | None = None
    sent: tuple[str, str] | None = None  # a notice as soon as it is sent (title, text): for slow actions
    then: Callable[[], None] | None = None  # after the answer, done or failed (refresh a screen's own data)


_EFFECT = {
    "drain": "New sessions go to other servers; its {n} active session(s) finish there.",
    "disable": "It leaves rotation now; its {n} active session(s) move to other servers.",
    "enable": "It goes back into rotation and receives new sessions.",
}


def server_question(action: str, s: ServerView) -> tuple[str, str]:
    return (f"{action.capitalize()} [b]{s.name}[/b]?",
            f"Now {s.state} (admin {s.admin}) on {s.host}.\n" + _EFFECT[action].format(n=s.active_sessions))


class ConfirmAction(ModalScreen[str | None]):
    """Answers the typed value ("" without a field) on yes, None on cancel."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str, detail: str, verb: str, field: Field | None = None) -> None:
        super().__init__()
        self.question = question
        self.detail = detail
        self.verb = verb
        self.field = field

    def compose(self) -> ComposeResult:
        with Grid(id="confirm-box", classes="-with-field" if self.field else ""):
            yield Label(self.question, id="confirm-question")
            yield Label(self.detail, id="confirm-detail")
            if self.field is not None:
                f = self.field
                field = Input(f.value, placeholder=f.placeholder, id="confirm-input", type=f.kind,  # type: ignore[arg-type]
                              max_length=f.max_length)
                field.cursor_blink = False  # a steady cursor: the dialog looks the same in every picture of it
                yield field
            with Horizontal(id="confirm-buttons"):
                yield Button(f"{self.verb} (y)", variant="warning", id="yes")
                yield Button("Cancel (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#confirm-input" if self.field else "#no").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_answer(event.button.id == "yes")

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_answer(True)

    def action_answer(self, yes: bool) -> None:
        if not yes:
            self.dismiss(None)
            return
        value = self.query_one(Input).value.strip() if self.field else ""
        problem = self.field.check(value) if self.field and self.field.check else None
        if problem:
            self.notify(problem, severity="warning")
            return
        self.dismiss(value)

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

from console.capacity import Capacity, provider_capacity, server_capacity
from console.messages import ActionDone
from ctops.wire import LLMProviderView, ServerView


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
    # taking the last capacity away: a second step that names the outage and wants the target typed
    outage: str | None = None


def outage_step(ask: Ask) -> ConfirmAction:
    """The second dialog before an action that leaves nothing in rotation: it names the outage and
    only goes on once the target's name is typed, so no reflex (y, y) causes one."""
    assert ask.outage is not None
    name = ask.target.split()[-1]

    def check(value: str) -> str | None:
        return None if value == name else f"Type {name} to confirm the outage, or press Esc to cancel."

    return ConfirmAction(f"[b red]This causes an outage.[/] {ask.question}", ask.outage, f"{ask.verb} anyway",
                         Field("", f"type {name} to confirm", max_length=128, check=check))


_EFFECT = {
    "drain": "New sessions go to other servers; its {n} active session(s) finish there.",
    "disable": "It leaves rotation now; its {n} active session(s) move to other servers.",
    "enable": "It goes back into rotation and receives new sessions.",
}
_LAST_EFFECT = {
    "drain": "No other server is in rotation: new sessions get 503; its {n} active session(s) finish there.",
    "disable": "No other server is in rotation: its {n} active session(s) and every new one get 503.",
    "enable": "Its health is {health}: it takes no sessions until it answers its health checks.",
}


def server_question(action: str, s: ServerView, servers: list[ServerView] | None = None
                    ) -> tuple[str, str, str | None]:
    """(question, detail, outage): outage is set when the action leaves no server in rotation."""
    cap = server_capacity(action, s, servers if servers is not None else [s])
    effect = (_LAST_EFFECT if cap.after == 0 else _EFFECT)[action].format(n=s.active_sessions, health=s.health)
    detail = f"Now {s.state} (admin {s.admin}) on {s.host}.\n{effect}\n{_capacity_line(cap)}"
    outage = None
    if action != "enable" and cap.takes_last:
        outage = (f"{s.name} is the last server in rotation. After this NO server takes learners: every "
                  "learner request gets 503 until a server is enabled or comes back up.")
    return f"{action.capitalize()} [b]{s.name}[/b]?", detail, outage


def provider_effect(action: str, p: LLMProviderView, providers: list[LLMProviderView]) -> tuple[str, str | None]:
    """(capacity line, outage) for an LLM provider action."""
    cap = provider_capacity(action, p, providers)
    outage = None
    if action == "disable" and cap.takes_last:
        outage = (f"{p.name} is the last LLM provider in rotation. After this NO provider takes requests: "
                  "reviews cannot be served (learners wait for them) until a provider is enabled or recovers.")
    return _capacity_line(cap), outage


def _capacity_line(cap: Capacity) -> str:
    line = cap.sentence()
    if cap.after == 0 and cap.total:
        return f"[b red]{line} NO CAPACITY.[/]"
    return f"[b]{line}[/b]"


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

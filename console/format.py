"""How one server becomes one table row: pure functions, so the table only compares and renders."""

from __future__ import annotations

import re

from rich.text import Text

from ctops.wire import ServerView

# the glyph and the word carry the state without colour (NO_COLOR, monochrome terminals);
# colours are base ANSI names so they survive 256- and 16-colour terminals
STATE_STYLE: dict[str, tuple[str, str]] = {
    "up": ("●", "green"),
    "suspect": ("▲", "bold yellow"),
    "down": ("✖", "bold red"),
    "draining": ("◐", "blue"),
    "disabled": ("○", "dim"),
}

COLUMNS: tuple[tuple[str, Text, int], ...] = (
    # key, label, width (fixed: cells never trigger a width recomputation over all rows).
    # name..host fit 80 columns; the last error shows on wider terminals or by scrolling right
    ("name", Text("Server"), 14),
    ("state", Text("State"), 11),
    ("heartbeat", Text("Heartbeat", justify="right"), 9),
    ("cpu", Text("CPU", justify="right"), 6),
    ("memory", Text("Mem", justify="right"), 6),
    ("sessions", Text("Sessions", justify="right"), 8),
    ("host", Text("Host"), 12),
    ("error", Text("Last error"), 30),
)

Raw = tuple[object, ...]
_DIGITS = re.compile(r"(\d+)")


def raw(s: ServerView) -> Raw:
    """The values a row shows, in column order; the table diffs these, not the rendered Text."""
    return (
        s.name,
        s.state,
        _bucket_age(s.heartbeat_age_ms),
        None if s.cpu_percent is None else round(s.cpu_percent),
        None if s.memory_percent is None else round(s.memory_percent),
        s.active_sessions,
        s.host,
        # an old error on a server that is up again is history, not an alarm
        (s.last_error, s.state == "up") if s.last_error else None,
    )


def cell(column: int, value: object) -> Text:
    return _RENDER[column](value)


def _bucket_age(ms: int | None) -> int | None:
    # tenths of a second below 10 s, whole seconds above: the cell only changes when its text would
    if ms is None:
        return None
    return ms // 100 if ms < 10_000 else (ms // 1000) * 10


def _name(v: object) -> Text:
    return Text(str(v), style="bold")


def _state(v: object) -> Text:
    glyph, style = STATE_STYLE.get(str(v), ("?", ""))
    return Text(f"{glyph} {v}", style=style)


def _age(v: object) -> Text:
    if v is None:
        return Text("—", justify="right", style="dim")
    tenths = int(v)  # type: ignore[call-overload]
    secs = tenths / 10
    if secs < 10:
        label = f"{secs:.1f}s"
    elif secs < 120:
        label = f"{secs:.0f}s"
    else:
        label = f"{secs / 60:.0f}m"
    style = "bold red" if secs >= 5 else "yellow" if secs >= 2 else ""
    return Text(label, justify="right", style=style)


def _percent(v: object) -> Text:
    if v is None:
        return Text("—", justify="right", style="dim")
    p = int(v)  # type: ignore[call-overload]
    return Text(f"{p}%", justify="right", style="bold red" if p >= 90 else "yellow" if p >= 75 else "")


def _int(v: object) -> Text:
    return Text(str(v), justify="right")


def _plain(v: object) -> Text:
    return Text(str(v))


def _error(v: object) -> Text:
    if v is None:
        return Text("")
    message, historical = v  # type: ignore[misc]
    return Text(str(message), style="dim" if historical else "red", no_wrap=True, overflow="ellipsis")


_RENDER = (_name, _state, _age, _percent, _percent, _int, _plain, _error)


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """trainer-2 sorts before trainer-10."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in _DIGITS.split(name) if t)

"""The live events list: newest at the bottom, bounded, fed incrementally by the fetch cycle.

An OptionList, so each event wraps to the pane's width and is laid out again whenever the width
changes (a resize, or a tab shown again: events that came while another tab showed are drawn at the
width they are shown at, not at the width of a hidden pane), and Enter opens an event in full.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from textual import on
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from console.format import event_line
from ctops.wire import Event


class EventsLog(OptionList):
    def __init__(self, *, max_lines: int = 500, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.max_lines = max_lines
        self.events: deque[Event] = deque(maxlen=max_lines)
        self.count = 0

    def add(self, events: Iterable[Event]) -> None:
        new = list(events)
        if not new:
            return
        # follow the stream unless someone moved up to read an older event
        follow = self.highlighted is None or self.highlighted >= self.option_count - 1
        self.events.extend(new)
        self.count += len(new)
        self.add_options(Option(event_line(e, wrap=True)) for e in new)
        for _ in range(self.option_count - self.max_lines):
            self.remove_option_at_index(0)
        if follow:
            if self.can_focus and self.option_count:
                self.highlighted = self.option_count - 1
            self.scroll_end(animate=False, immediate=False)

    @on(OptionList.OptionSelected)
    def _open(self, event: OptionList.OptionSelected) -> None:
        from console.screens.notices import EventDetail  # noqa: PLC0415 - a screen, loaded when first opened

        event.stop()
        if 0 <= event.option_index < len(self.events):
            self.app.push_screen(EventDetail(self.events[event.option_index]))

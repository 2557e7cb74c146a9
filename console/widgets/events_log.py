"""The live events pane: newest at the bottom, bounded, fed incrementally by the fetch cycle."""

from __future__ import annotations

from collections.abc import Iterable

from textual.widgets import RichLog

from console.format import event_line
from ctops.wire import Event


class EventsLog(RichLog):
    def __init__(self, *, max_lines: int = 500, **kwargs: object) -> None:
        super().__init__(max_lines=max_lines, wrap=False, markup=False, auto_scroll=True, min_width=40,
                         **kwargs)  # type: ignore[arg-type]
        self.count = 0

    def add(self, events: Iterable[Event]) -> None:
        for e in events:
            self.write(event_line(e))
            self.count += 1

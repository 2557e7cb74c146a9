"""The live events pane: newest at the bottom, bounded, fed incrementally by the fetch cycle.

Lines are drawn at the pane's own width and drawn again when it changes: RichLog measures a line
against the app's console (80 columns until the terminal says otherwise), which cut every line at
~78 columns on a 200-column terminal.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from textual.events import Resize
from textual.widgets import RichLog

from console.format import event_line
from ctops.wire import Event


class EventsLog(RichLog):
    def __init__(self, *, max_lines: int = 500, **kwargs: object) -> None:
        super().__init__(max_lines=max_lines, wrap=False, markup=False, auto_scroll=True, min_width=40,
                         **kwargs)  # type: ignore[arg-type]
        self.events: deque[Event] = deque(maxlen=max_lines)
        self.count = 0
        self._width = 0  # the width lines were drawn at; 0 until the pane has a size

    def add(self, events: Iterable[Event]) -> None:
        for e in events:
            self.events.append(e)
            self.count += 1
            if self._width:
                self.write(event_line(e), width=self._width)

    def on_resize(self, event: Resize) -> None:
        width = max(self.scrollable_content_region.width, self.min_width)
        if not event.size.width or width == self._width:
            return
        self._width = width
        self.clear()
        for e in self.events:
            self.write(event_line(e), width=width)

"""The live servers table. It only diffs and renders; the app feeds it."""

from __future__ import annotations

from collections.abc import Iterable

from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, RowKey

from console.format import COLUMNS, Raw, cell, natural_key, raw
from ctops.wire import ServerView

# past this many removals one rebuild beats many O(rows) remove_row calls
_REBUILD_AFTER = 64


class ServersTable(DataTable[object]):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)  # type: ignore[arg-type]
        self._shown: dict[str, Raw] = {}
        self._keys = [k for k, _, _ in COLUMNS]

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    @property
    def selected(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return key.value

    def apply(self, servers: Iterable[ServerView]) -> None:
        """Diff-update: changed cells in place, new rows added, gone rows removed; the cursor keeps its row."""
        new = {s.name: raw(s) for s in servers}
        selected = self.selected
        gone = [name for name in self._shown if name not in new]
        added = sorted((name for name in new if name not in self._shown), key=natural_key)
        structural = bool(gone or added)

        with self.app.batch_update():
            if len(gone) > _REBUILD_AFTER:
                self.clear()
                self._shown.clear()
                added = sorted(new, key=natural_key)
            else:
                for name in gone:
                    self.remove_row(name)
                    del self._shown[name]
            for name, values in new.items():
                old = self._shown.get(name)
                if old is None or old == values:
                    continue
                for col, (was, now) in enumerate(zip(old, values, strict=True)):
                    if was != now:
                        self.update_cell(name, self._keys[col], cell(col, now))
                self._shown[name] = values
            if added:
                last = max(self._shown, key=natural_key) if self._shown else None
                for name in added:
                    values = new[name]
                    self.add_row(*(cell(i, v) for i, v in enumerate(values)), key=name)
                    self._shown[name] = values
                # appending keeps the order unless a new name sorts before an existing one
                if last is not None and natural_key(added[0]) < natural_key(last):
                    self.sort("name", key=lambda text: natural_key(text.plain))
            if structural and selected is not None and selected in self._shown:
                self.move_cursor(row=self.get_row_index(RowKey(selected)), animate=False, scroll=True)

    def shown(self, name: str) -> Raw | None:
        return self._shown.get(name)

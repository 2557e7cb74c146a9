"""A DataTable that diff-updates from {row key: raw values}; the cursor keeps its row.

Only cells whose raw value changed are rendered and updated; when nothing changed the table is
not touched at all, so Textual has nothing to redraw.

DataTable.update_cell bumps one table-wide counter that is part of every render-cache key, so a
single changed cell makes Textual re-render every visible cell (~400 at 200x50, the bulk of a
refresh). Value changes here instead store the new cell, drop only the changed rows' cache
entries and refresh only those rows' screen lines when visible. That leans on DataTable's
private caches (Textual 8); if they are not there, it falls back to update_cell, and a test
compares the result with a full re-render.

Rendering a changed cell through Rich (Styled(Padding(Text)) -> render_lines) costs ~0.2 ms;
with every visible row changing (CPU columns of a busy cluster) that was most of a refresh.
Body cells here are one-line Text, so `_render_cell` builds the same segments directly; the
header and anything unusual go through DataTable's own path, and a test checks both agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import cast

from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual._two_way_dict import TwoWayDict
from textual.geometry import Region
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, ColumnKey, RowKey

from console.commands import bindings
from console.format import Column, Raw, Render, natural_key


class Cell:
    """A cell rendered only when drawn: thousands change per refresh, a few dozen are on screen."""

    __slots__ = ("_render", "_text", "value")

    def __init__(self, value: object, render: Render) -> None:
        self.value = value
        self._render = render
        self._text: Text | None = None

    @property
    def text(self) -> Text:
        if self._text is None:
            self._text = self._render(self.value)
        return self._text

    @property
    def plain(self) -> str:
        return self.text.plain

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        yield self.text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.text)


# past this many removals one rebuild beats many O(rows) remove_row calls
_REBUILD_AFTER = 64
# past this many changed rows, dropping every cached row beats picking entries out
_CLEAR_CACHES_AFTER = 200


def sort_value(v: object) -> tuple[int, object]:
    """An order over a column's raw values: numbers, then text (naturally: trainer-2 < trainer-10), then blanks."""
    if isinstance(v, tuple):
        return sort_value(v[0]) if v else (2, 0)
    if isinstance(v, bool | int | float):
        return (0, float(v))
    if v is None:
        return (2, 0)
    return (1, natural_key(str(v)))


def row_text(key: str, values: Raw) -> str:
    """What `/` searches: the row key and every raw value as text, lower case."""
    parts = [key]
    for v in values:
        if isinstance(v, tuple):
            parts += [str(x) for x in v if x is not None and not isinstance(x, bool)]
        elif v is not None:
            parts.append(str(v))
    return " ".join(parts).lower()


class LiveTable(DataTable[object]):
    COLUMNS: tuple[Column, ...] = ()
    # `/`, `f`, `o`/`O`, j/k/g/G and Enter, from the command table (console/commands.py)
    BINDINGS = bindings("table")

    class ViewChanged(Message):
        """The rows shown under a view changed (filter, faults only, sort, or a refresh under one)."""

        def __init__(self, table: LiveTable) -> None:
            super().__init__()
            self.table = table

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)  # type: ignore[arg-type]
        self._shown: dict[str, Raw] = {}
        self._all: Mapping[str, Raw] = {}  # every row of the last fetch, the filtered-out ones included
        self.filter_words: list[str] = []
        self.faults_only = False
        self.sort_column: int | None = None  # None: by key (the natural order)
        self.sort_reverse = False
        self._natural: dict[str, tuple[tuple[int, int | str], ...]] = {}  # row key -> natural_key, memoised
        self._keys = [c.key for c in self.COLUMNS]
        self._column_keys = [ColumnKey(k) for k in self._keys]
        self._pending: Mapping[str, Raw] | None = None
        self._renderers = [c.render for c in self.COLUMNS]
        self.cells_updated = 0  # for tests and the benchmark
        self.fast_updates = all(hasattr(self, a) for a in (
            "_data", "_cell_render_cache", "_row_render_cache", "_row_renderable_cache", "_line_cache",
            "_row_locations", "_update_count"))

    def on_mount(self) -> None:
        for c in self.COLUMNS:
            self.add_column(c.label, key=c.key, width=c.width)

    def catch_up(self) -> int:
        """Apply the rows kept while hidden."""
        return self.apply(self._pending) if self._pending is not None else 0

    @property
    def selected(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return key.value

    def shown(self, key: str) -> Raw | None:
        return self._shown.get(key)

    # --- the view: filter, faults only, sort ------------------------------------------------------

    @property
    def viewing(self) -> bool:
        """True while a filter, the fault-only toggle or a column sort changes which rows show, or their order."""
        return bool(self.filter_words) or self.faults_only or self.sort_column is not None or self.sort_reverse

    @property
    def total(self) -> int:
        return len(self._all)

    def set_view(self, *, words: list[str] | None = None, faults_only: bool | None = None,
                 sort_column: int | None | bool = False, reverse: bool | None = None) -> None:
        """Change the view and redraw the rows at once (sort_column=False leaves the sort as it is)."""
        if words is not None:
            self.filter_words = [w.lower() for w in words]
        if faults_only is not None:
            self.faults_only = faults_only
        if sort_column is not False:
            self.sort_column = sort_column
        if reverse is not None:
            self.sort_reverse = reverse
        self._label_sorted_column()
        if self._pending is None:
            self._rebuild(self._view(self._all))
        self.post_message(self.ViewChanged(self))

    def action_filter(self) -> None:
        from console.screens.cmdline import open_filter  # noqa: PLC0415 - the prompt imports this module

        open_filter(self)

    def action_toggle_faults(self) -> None:
        self.set_view(faults_only=not self.faults_only)

    def action_sort_next(self) -> None:
        """Sort by the next column to the right (after the last: back to the natural order)."""
        col = 0 if self.sort_column is None else self.sort_column + 1
        self.set_view(sort_column=None if col >= len(self.COLUMNS) else col)

    def action_sort_reverse(self) -> None:
        self.set_view(sort_column=self.sort_column if self.sort_column is not None else 0,
                      reverse=not self.sort_reverse)

    def view_note(self) -> str:
        """One line saying what the view hides or how it orders, '' when it shows every row by key."""
        parts = []
        if self.filter_words:
            parts.append(f"filter '{' '.join(self.filter_words)}'")
        if self.faults_only:
            parts.append("faults only")
        if self.sort_column is not None:
            parts.append(f"sorted by {self.COLUMNS[self.sort_column].label.plain}"
                         + (" (descending)" if self.sort_reverse else ""))
        if not parts:
            return ""
        return f"{self.row_count} of {self.total} rows · " + " · ".join(parts)

    def is_fault(self, raw: Raw) -> bool:
        """Which rows the fault-only view keeps: each table knows what a fault looks like in its rows."""
        return True

    def _view(self, rows: Mapping[str, Raw]) -> dict[str, Raw]:
        words, fault = self.filter_words, self.is_fault
        keep = {k: v for k, v in rows.items()
                if (not self.faults_only or fault(v)) and all(w in row_text(k, v) for w in words)}
        natural = self._natural_key
        if self.sort_column is None:
            order = sorted(keep, key=natural, reverse=self.sort_reverse)
        else:
            col = self.sort_column
            # ties keep the natural order of the keys, so equal rows do not swap places between refreshes;
            # blanks go last either way (a down server's CPU is not the lowest CPU)
            values = {k: sort_value(v[col]) for k, v in keep.items()}
            named = sorted(keep, key=natural)
            blank = [k for k in named if values[k][0] == 2]
            valued = [k for k in named if values[k][0] != 2]
            order = sorted(valued, key=values.__getitem__, reverse=self.sort_reverse) + blank
        return {k: keep[k] for k in order}

    def _natural_key(self, key: str) -> tuple[tuple[int, int | str], ...]:
        found = self._natural.get(key)
        if found is None:
            found = self._natural[key] = natural_key(key)
        return found

    def _rebuild(self, rows: Mapping[str, Raw]) -> None:
        """Show exactly these rows in this order; the cursor stays on its row if it is still shown."""
        selected = self.selected
        render = self._renderers
        with self.app.batch_update():
            self.clear()
            self._shown.clear()
            for k, values in rows.items():
                self.add_row(*(Cell(v, render[i]) for i, v in enumerate(values)), key=k)
                self._shown[k] = values
            if selected is not None and selected in self._shown:
                self.move_cursor(row=self.get_row_index(RowKey(selected)), animate=False, scroll=True)

    def _reorder(self, order: list[str]) -> None:
        """Move rows into a new order without rebuilding them (DataTable.sort's own way, keyed by our
        order): at 2,000 rows a rebuild costs hundreds of ms, this a few. The cursor stays on its row."""
        selected = self.selected
        self._row_locations = TwoWayDict({RowKey(k): i for i, k in enumerate(order)})
        self._shown = {k: self._shown[k] for k in order}
        self._update_count += 1  # every cached render is stale now (the caches are keyed on it): drop them
        for cache in (self._cell_render_cache, self._row_render_cache, self._row_renderable_cache):
            cache.clear()
        self.refresh()
        if selected is not None and order.index(selected) != self.cursor_row:
            self.move_cursor(row=order.index(selected), animate=False, scroll=False)

    def _label_sorted_column(self) -> None:
        for i, c in enumerate(self.COLUMNS):
            col = self.columns.get(ColumnKey(c.key))
            if col is None:
                continue
            mark = ("▼" if self.sort_reverse else "▲") if i == self.sort_column else ""
            label = c.label.copy()
            if mark:
                label.append(mark, style="bold")
            col.label = label
        self._update_count += 1  # the header is cached on this counter
        self.refresh()

    # --- applying a fetch ---------------------------------------------------------------------------

    def apply(self, new: Mapping[str, Raw], *, visible: bool = True) -> int:
        """Diff-update: changed cells in place, new rows added, gone rows removed. Returns cells changed.

        A table that is not on screen (another tab) only keeps the rows; they are applied when it is shown.
        While a view (filter, faults only, sort) is on, rows that change place or come and go make the
        table rebuild; rows that only change values are still updated cell by cell.
        """
        self._all = new
        if not visible:
            self._pending = new
            return 0
        self._pending = None
        if self.viewing:
            view = self._view(new)
            if list(view) != list(self._shown):
                if self.fast_updates and view.keys() == self._shown.keys():
                    self._reorder(list(view))  # the same rows in another order: sorted by a changing column
                else:
                    self._rebuild(view)
                    self.post_message(self.ViewChanged(self))
                    count = sum(len(v) for v in view.values())
                    self.cells_updated += count
                    return count
            new = view
        shown = self._shown
        gone = [k for k in shown if k not in new]
        added = [k for k in new if k not in shown]
        changed: list[tuple[str, Raw, Raw]] = []
        for k, values in new.items():
            old = shown.get(k)
            if old is not None and old != values:
                changed.append((k, old, values))
        if not (gone or added or changed):
            return 0  # nothing visible changed: no refresh at all

        selected = self.selected
        count = 0
        with self.app.batch_update():
            last = max(shown, key=natural_key) if shown and added else None
            added.sort(key=natural_key)
            # appending keeps the order unless a new key sorts before an existing one: then rebuild (rare)
            if len(gone) > _REBUILD_AFTER or (last is not None and natural_key(added[0]) < natural_key(last)):
                self.clear()
                shown.clear()
                added = sorted(new, key=natural_key)
                changed = []
            else:
                for k in gone:
                    self.remove_row(k)
                    del shown[k]
            render, keys = self._renderers, self._keys
            if self.fast_updates and changed:
                count += self._set_cells(changed)
            else:
                for k, old, values in changed:
                    for col, (was, now) in enumerate(zip(old, values, strict=True)):
                        if was != now:
                            self.update_cell(k, keys[col], Cell(now, render[col]))
                            count += 1
                    shown[k] = values
            for k in added:
                values = new[k]
                self.add_row(*(Cell(v, render[i]) for i, v in enumerate(values)), key=k)
                shown[k] = values
                count += len(values)
            if (gone or added) and selected is not None and selected in shown:
                self.move_cursor(row=self.get_row_index(RowKey(selected)), animate=False, scroll=True)
        self.cells_updated += count
        return count

    def _set_cells(self, changed: list[tuple[str, Raw, Raw]]) -> int:
        """Store changed cells without bumping DataTable's table-wide update counter (see the module doc)."""
        render, data, shown = self._renderers, self._data, self._shown
        col_keys = self._column_keys
        count = 0
        dirty_rows: set[str] = set()
        dirty_cells: set[tuple[str, str]] = set()
        for k, old, values in changed:
            row = data.get(k)  # type: ignore[call-overload]  # RowKey hashes and compares as its string
            if row is None:
                raise CellDoesNotExist(f"No row {k!r}")
            for col, (was, now) in enumerate(zip(old, values, strict=True)):
                if was != now:
                    row[col_keys[col]] = Cell(now, render[col])
                    dirty_cells.add((k, self._keys[col]))
                    count += 1
            shown[k] = values
            dirty_rows.add(k)
        # drop the changed cells' cached renders only: unchanged cells of a changed row stay cached
        # (re-rendering a cell through Rich is the costliest step of a refresh)
        cells = self._cell_render_cache
        for cell_key in [key for key in cells.keys() if (key[0].value, key[1].value) in dirty_cells]:
            cells.discard(cell_key)
        if len(dirty_rows) > _CLEAR_CACHES_AFTER:
            self._row_render_cache.clear()  # cheap to rebuild from the cell cache
            self._row_renderable_cache.clear()
        else:
            rows = self._row_render_cache
            for row_key in [key for key in rows.keys() if key[0].value in dirty_rows]:
                rows.discard(row_key)
            renderables = self._row_renderable_cache
            indexes = {self._row_locations.get(RowKey(k)) for k in dirty_rows}
            for renderable_key in [key for key in renderables.keys() if key[1] in indexes]:
                renderables.discard(renderable_key)
        self._line_cache.clear()  # lines are re-joined from the row caches, which stay warm
        # every row is one line high: row i is content line header + i; refresh only the visible ones
        header = self.header_height if self.show_header else 0
        top = self.scroll_offset.y
        height, width = self.size.height, self.size.width
        first, last = top, top + height - header  # row indexes on screen
        locations = self._row_locations
        for k in dirty_rows:
            i = locations.get(RowKey(k))
            if i is not None and first <= i <= last:
                self.refresh(Region(0, header + i - top, width, 1))
        return count

    # --- rendering ----------------------------------------------------------------------------------

    fast_render = True

    def _render_cell(
        self,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool = False,
        hover: bool = False,
    ) -> list[list[Segment]]:
        if not self.fast_render or row_index < 0 or column_index < 0 or self.fixed_rows or self.fixed_columns:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        # both indexes are in the table here (DataTable renders only what it holds)
        row_key = cast(RowKey, self._row_locations.get_key(row_index))
        column_key = cast(ColumnKey, self._column_locations.get_key(column_index))
        cache_key = (row_key, column_key, base_style, cursor, hover, self._show_hover_cursor,
                     self._update_count, self._pseudo_class_state)
        cached = self._cell_render_cache.get(cache_key)
        if cached is not None:
            return cached
        cell = self._data[row_key][column_key]
        row = self.rows[row_key]
        if not isinstance(cell, Cell) or row.height != 1:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        component_style, post_style = self._get_styles_to_render_cell(
            False, False, False, hover, cursor, self.show_cursor, self._show_hover_cursor,
            self.cursor_foreground_priority == "css", self.cursor_background_priority == "css",
        )
        # Style additions are cached on their operands; only the per-cell meta (for mouse clicks) is new
        line = one_line(self.app.console, cell.text, width, self.cell_padding, base_style + component_style,
                        post_style, Style.from_meta({"row": row_index, "column": column_index}))
        if line is None:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        lines = [line]
        self._cell_render_cache[cache_key] = lines
        return lines


def one_line(console: Console, text: Text, width: int, padding: int, pre: Style,
             post: Style | None, meta: Style) -> list[Segment] | None:
    """What Styled(Padding(text, (0, padding)), pre + meta, post) renders to in one line of `width`
    cells, for a plain one-line Text (no spans, left or right justified); None for anything else."""
    if text.spans or text.justify == "center" or "\n" in text.plain:
        return None
    inner = max(0, width - 2 * padding)
    t = text
    if t.cell_len > inner:
        t = text.copy()
        t.truncate(inner, overflow=t.overflow or "fold")
    plain = t.plain
    gap = inner - t.cell_len
    if t.justify == "right":
        plain, gap = " " * gap + plain, 0
    blank = pre + post if post else pre
    blank_style = blank + meta
    segments = [Segment(" " * padding, blank_style)] if padding else []
    if plain:
        inner_style = pre + console.get_style(t.style) if t.style else pre
        if post:
            inner_style = inner_style + post
        segments.append(Segment(plain, inner_style + meta))
    if gap + padding:
        segments.append(Segment(" " * (gap + padding), blank_style))
    return segments

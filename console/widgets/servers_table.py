"""The live servers table. It only diffs and renders; the app feeds it rows prepared off the loop."""

from __future__ import annotations

from collections.abc import Iterable

from console.format import SERVER_COLUMNS, server_raw
from console.widgets.live_table import LiveTable
from ctops.wire import ServerView


class ServersTable(LiveTable):
    COLUMNS = SERVER_COLUMNS

    def apply_servers(self, servers: Iterable[ServerView]) -> int:
        return self.apply({s.name: server_raw(s) for s in servers})

"""The other live tables: supervised processes per host, dispatchers, LLM providers, store nodes."""

from __future__ import annotations

from console.format import DISPATCHER_COLUMNS, PROCESS_COLUMNS, PROVIDER_COLUMNS, STORE_COLUMNS
from console.widgets.live_table import LiveTable


class ProcessesTable(LiveTable):
    """One row per supervised process (key "host/process"); a host without processes gets one row."""

    COLUMNS = PROCESS_COLUMNS


class DispatchersTable(LiveTable):
    COLUMNS = DISPATCHER_COLUMNS


class ProvidersTable(LiveTable):
    COLUMNS = PROVIDER_COLUMNS


class StoreTable(LiveTable):
    """The store's nodes: primary, replicas, Sentinels (key: node name)."""

    COLUMNS = STORE_COLUMNS

"""The live tables: servers, supervised processes per host, dispatchers, LLM providers, store nodes,
quarantined records. They only diff and render; the app feeds them rows prepared off the loop."""

from __future__ import annotations

from console.format import (
    DISPATCHER_COLUMNS,
    PROCESS_COLUMNS,
    PROVIDER_COLUMNS,
    QUARANTINE_COLUMNS,
    SERVER_COLUMNS,
    STORE_COLUMNS,
)
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


class ServersTable(LiveTable):
    COLUMNS = SERVER_COLUMNS


class QuarantineTable(LiveTable):
    """Damaged records set aside (key: quarantine id, so the oldest comes first)."""

    COLUMNS = QUARANTINE_COLUMNS

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
    Raw,
)
from console.widgets.live_table import LiveTable

# what the fault-only view (`f`) keeps, by table: rows in these columns' raw values (console/format.py)


def _server_fault(raw: Raw) -> bool:
    # state, diagnosis: anything not up, or up with a diagnosis (a fault behind an admin state counts too)
    return raw[1] != "up" or raw[2] not in ("ok", "admin")


def _process_fault(raw: Raw) -> bool:
    # agent state, process state, watchdog (dead threads' names first)
    watchdog = raw[9]
    return raw[1] != "alive" or raw[3] not in ("running", None) or (isinstance(watchdog, tuple)
                                                                   and watchdog[0] is not None)


class ProcessesTable(LiveTable):
    """One row per supervised process (key "host/process"); a host without processes gets one row."""

    COLUMNS = PROCESS_COLUMNS

    def is_fault(self, raw: Raw) -> bool:
        return _process_fault(raw)


class DispatchersTable(LiveTable):
    COLUMNS = DISPATCHER_COLUMNS

    def is_fault(self, raw: Raw) -> bool:
        return raw[2] is not True  # healthy


class ProvidersTable(LiveTable):
    COLUMNS = PROVIDER_COLUMNS

    def is_fault(self, raw: Raw) -> bool:
        return raw[2] != "up" or raw[3] != "closed"  # state, breaker


class StoreTable(LiveTable):
    """The store's nodes: primary, replicas, Sentinels (key: node name)."""

    COLUMNS = STORE_COLUMNS

    def is_fault(self, raw: Raw) -> bool:
        return raw[2] != "up"


class ServersTable(LiveTable):
    COLUMNS = SERVER_COLUMNS

    def is_fault(self, raw: Raw) -> bool:
        return _server_fault(raw)


class QuarantineTable(LiveTable):
    """Damaged records set aside (key: quarantine id, so the oldest comes first)."""

    COLUMNS = QUARANTINE_COLUMNS

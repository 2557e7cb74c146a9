"""What the workers tell the app. Workers do I/O (and parse off the loop); handlers on the app update widgets."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message

from console.client import Whoami
from console.format import Raw
from ctops.wire import ClusterState, Event, LLMProviderView, StoreIntegrityView


@dataclass(frozen=True, slots=True)
class Prepared:
    """Rows for every table, computed in a worker thread from one fetch."""

    servers: dict[str, Raw]
    processes: dict[str, Raw]
    dispatchers: dict[str, Raw]
    providers: dict[str, Raw] | None
    store: dict[str, Raw] = field(default_factory=dict)
    quarantined: dict[str, Raw] | None = None  # None: not read this time (Store tab not shown) or not served


@dataclass
class StateFetched(Message):
    state: ClusterState
    prepared: Prepared | None = None
    events: list[Event] | None = None  # None: not fetched this time (or the fetch failed)
    providers: list[LLMProviderView] | None = None
    providers_error: str | None = None
    integrity: StoreIntegrityView | None = None
    integrity_error: str | None = None
    parse_ms: float = 0.0  # rows prepared in the worker thread (`ctops bench console` reports it)


@dataclass
class FetchFailed(Message):
    reason: str
    unreachable: bool  # False: the API answered with an error (bad token, 5xx)


@dataclass
class WhoamiFetched(Message):
    who: Whoami


@dataclass
class ActionDone(Message):
    title: str
    message: str
    severity: str = "information"
    key: str | None = None  # the incident it belongs to (notices of one incident replace each other)


@dataclass
class ActionFailed(Message):
    target: str
    action: str
    status: int | None  # None: nothing answered
    reason: str
    what: str = "servers"  # what kind of thing the action applies to, for the 403 text

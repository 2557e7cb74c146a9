"""Exception events and the views the ops API serves for them; shared by services, dispatcher, console and CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ctops.opsapi import GroupAction as GroupAction  # the contract's; re-exported for the capture side

GroupStatus = Literal["unresolved", "acknowledged", "resolved", "muted", "regressed"]
STATUSES: tuple[str, ...] = ("unresolved", "acknowledged", "resolved", "muted", "regressed")

# what one event may carry; the capture side truncates to these so a valid event is never refused
MAX_FRAMES = 60
MAX_MESSAGE = 4000
MAX_CONTEXT_VALUE = 500
MAX_CONTEXT_KEYS = 40
MAX_BATCH = 500

Scalar = str | int | float | bool | None


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Frame(_Wire):
    filename: str = Field(max_length=1000)
    module: str | None = Field(None, max_length=300)
    function: str = Field(max_length=300)
    lineno: int | None = Field(None, ge=0)
    in_app: bool = False
    context_line: str | None = Field(None, max_length=1000)


class ExceptionEvent(_Wire):
    event_id: str = Field(pattern=r"^[A-Za-z0-9_.:\-]{8,80}$")
    ts_ms: int = Field(ge=0)
    service: str = Field(min_length=1, max_length=64)
    host: str = Field(min_length=1, max_length=128)
    type: str = Field(min_length=1, max_length=200)
    message: str = Field("", max_length=MAX_MESSAGE)
    level: Literal["warning", "error", "critical"] = "error"
    source: Literal["capture", "logtail", "sentry"] = "capture"
    logger: str | None = Field(None, max_length=200)
    frames: list[Frame] = Field(default_factory=list, max_length=MAX_FRAMES)
    context: dict[str, Scalar] = Field(default_factory=dict, max_length=MAX_CONTEXT_KEYS)


class SenderCounters(_Wire):
    """Cumulative for one spool: what a sender lost, so staff see it next to the groups."""

    sender: str = Field(min_length=1, max_length=200)
    dropped: int = Field(0, ge=0)  # spool full (oldest segment dropped) or in-memory queue full
    corrupt: int = Field(0, ge=0)  # torn or corrupt spool records skipped at replay
    rejected: int = Field(0, ge=0)  # events the dispatcher refused as invalid


class ExceptionBatch(_Wire):
    events: list[ExceptionEvent] = Field(min_length=1, max_length=MAX_BATCH)
    counters: SenderCounters | None = None


class IngestResult(_Wire):
    accepted: int
    duplicates: int


class GroupView(_Wire):
    id: str
    type: str
    message: str
    culprit: str  # module.function of the innermost in-app frame
    count: int
    first_seen_ms: int
    last_seen_ms: int
    hosts: list[str]
    services: list[str]
    status: GroupStatus
    assignee: str | None = None
    mute_until_ms: int | None = None


class ExceptionStats(_Wire):
    groups: int
    events: int  # in the capped stream
    dropped: int
    corrupt: int
    rejected: int
    senders_losing: list[str] = Field(default_factory=list)


class GroupList(_Wire):
    groups: list[GroupView]
    total: int  # matching the filter, before the limit
    stats: ExceptionStats


class Occurrence(_Wire):
    id: str  # stream id: ordered, usable as a cursor
    group_id: str
    event: ExceptionEvent


class GroupDetail(_Wire):
    group: GroupView
    latest: ExceptionEvent | None
    recent: list[ExceptionEvent]


class TailPage(_Wire):
    items: list[Occurrence]
    cursor: str | None  # pass as `after` for the next page; None when the stream is empty


class GroupActionResult(_Wire):
    ok: bool
    group: GroupView
    by: str


def traceback_text(e: ExceptionEvent) -> str:
    """The event as Python prints a traceback, so it reads (and highlights) like one."""
    lines = []
    if e.frames:
        lines.append("Traceback (most recent call last):")
        for f in e.frames:
            where = f'  File "{f.filename}", line {f.lineno if f.lineno is not None else "?"}, in {f.function}'
            lines.append(where)
            if f.context_line:
                lines.append(f"    {f.context_line.strip()}")
    lines.append(f"{e.type}: {e.message}" if e.message else e.type)
    return "\n".join(lines)

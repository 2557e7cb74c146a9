"""What the workers tell the app. Workers do I/O; handlers on the app update widgets."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from console.client import Whoami
from ctops.wire import ActionResult, ClusterState


@dataclass
class StateFetched(Message):
    state: ClusterState


@dataclass
class FetchFailed(Message):
    reason: str
    unreachable: bool  # False: the API answered with an error (bad token, 5xx)


@dataclass
class WhoamiFetched(Message):
    who: Whoami


@dataclass
class ActionDone(Message):
    result: ActionResult
    action: str


@dataclass
class ActionFailed(Message):
    server: str
    action: str
    status: int | None  # None: nothing answered
    reason: str

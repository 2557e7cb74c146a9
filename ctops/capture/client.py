"""Reading and triaging exception groups over the ops API (console and `ctops exceptions`). No Textual here."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from ctops.capture.wire import GroupActionResult, GroupDetail, GroupList, TailPage
from ctops.opsapi import GroupAction
from ctops.opsclient import OpsClient


class ExceptionsClient:
    """The exception-group routes, over an OpsClient's URL failover and error mapping; owns nothing,
    so closing is the caller's."""

    def __init__(self, ops: OpsClient) -> None:
        self.ops = ops

    async def groups(self, *, sort: str = "last", status: str | None = None, q: str = "",
                     limit: int = 500) -> GroupList:
        params: dict[str, str | int] = {"sort": sort, "limit": limit}
        if status:
            params["status"] = status
        if q:
            params["q"] = q
        return await self.ops.get(GroupList, f"/exceptions/groups?{urlencode(params)}")

    async def group(self, gid: str, recent: int = 20) -> GroupDetail:
        path = f"/exceptions/groups/{quote(gid, safe='')}?recent={recent}"
        return await self.ops.get(GroupDetail, path)

    async def tail(self, after: str | None = None, limit: int = 100, q: str = "") -> TailPage:
        params: dict[str, str | int] = {"limit": limit}
        if after:
            params["after"] = after
        if q:
            params["q"] = q
        return await self.ops.get(TailPage, f"/exceptions/tail?{urlencode(params)}")

    async def act(self, gid: str, action: GroupAction, *, minutes: int | None = None,
                  assignee: str | None = None) -> GroupActionResult:
        params: dict[str, str | int] = {}
        if minutes is not None:
            params["minutes"] = minutes
        if assignee is not None:
            params["assignee"] = assignee
        path = f"/exceptions/groups/{quote(gid, safe='')}/{action}" + (f"?{urlencode(params)}" if params else "")
        return await self.ops.post(GroupActionResult, path)

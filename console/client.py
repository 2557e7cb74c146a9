"""The console's ops-API client: the shared httpx client (ctops.opsclient), reading from the leader.

No Textual here; the app's workers call it.
"""

from __future__ import annotations

from ctops.opsclient import Action, OpsClient, OpsError, Unreachable, Whoami
from ctops.wire import ClusterState

__all__ = ["Action", "ConsoleClient", "OpsError", "Unreachable", "Whoami"]


class ConsoleClient(OpsClient):
    async def state(self, prefer_leader: bool = True) -> ClusterState:
        # a standby's health view may lag the leader's, and staff should act on what the leader sees
        return await super().state(prefer_leader=prefer_leader)

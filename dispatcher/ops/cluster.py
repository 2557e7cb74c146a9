"""Cluster state and heartbeats: who am I, agents' heartbeats, the dispatchers' mutual heartbeat,
and the state view (servers, hosts, dispatchers, store, data-plane counters)."""

# no `from __future__ import annotations`: FastAPI must see the closures in the annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from ctops.auth import Principal
from ctops.config import DispatcherSpec
from ctops.statefeed import FeedLog
from ctops.wire import HEARTBEAT_DECODER, ClusterState, Heartbeat, HeartbeatAck, PeerHeartbeat, StateChanges
from dispatcher.events import EventLog
from dispatcher.ingest import HeartbeatWriter
from dispatcher.lease import Lease
from dispatcher.ops.auth import Auth
from dispatcher.ops.errors import R404, ApiError
from dispatcher.peers import Peers

# a state built this recently answers the next request for changes too
FEED_REUSE_S = 0.25
ClusterStateView = Callable[[dict | None], Awaitable[ClusterState]]


def heartbeat_ack(lease: Lease, dispatchers: list[DispatcherSpec]) -> HeartbeatAck:
    """What a heartbeat is answered: who leads, and where, for the agent to follow."""
    leader = lease.leader_name
    url = next((d.ops_url for d in dispatchers if d.name == leader), None)
    return HeartbeatAck(ok=True, leader=leader, leader_ops_url=url)


def cluster_router(auth: Auth, writer: HeartbeatWriter, events: EventLog, lease: Lease, peers: Peers,
                   dispatchers: list[DispatcherSpec], known_hosts: frozenset[str],
                   cluster_state: ClusterStateView, proxy_counters: Callable[[], dict] | None) -> APIRouter:
    router = APIRouter()
    dispatcher_names = {d.name for d in dispatchers}

    @router.get("/api/v1/whoami")
    async def whoami(who: Annotated[Principal, Depends(auth.principal)]) -> dict[str, str]:
        return {"name": who.name, "role": who.role}

    @router.post("/api/v1/heartbeat", response_model=HeartbeatAck, responses=R404)
    async def heartbeat(hb: Heartbeat, request: Request,
                        who: Annotated[Principal, Depends(auth.require("agent"))]) -> HeartbeatAck:
        await auth.for_host(request, who, hb.host)
        if hb.host not in known_hosts:
            raise ApiError(404, f"unknown host {hb.host!r}", detail={"known": sorted(known_hosts)})
        # valid heartbeats are taken before they get here (dispatcher/ingest.py); this one decoded only
        # leniently (e.g. a number sent as a string): stored the same way all the same
        await writer.submit(HEARTBEAT_DECODER.decode(hb.model_dump_json()))
        if hb.events:
            await events.ingest_agent_events(hb.host, hb.events)
        return heartbeat_ack(lease, dispatchers)

    @router.get("/api/v1/state", response_model=ClusterState, response_class=JSONResponse)
    async def state(_: Annotated[Principal, Depends(auth.require("read"))]) -> Response:
        st = await cluster_state(proxy_counters() if proxy_counters is not None else None)
        # serialized once, here: FastAPI's response-model pass validates the whole document again
        # first, which at 2,000 hosts held the event loop (and the heartbeats behind it) for long
        return Response(st.model_dump_json(), media_type="application/json")

    feed = FeedLog()
    building = asyncio.Lock()
    built_at = [0.0]

    @router.get("/api/v1/state/changes", response_model=StateChanges, response_class=JSONResponse)
    async def state_changes(_: Annotated[Principal, Depends(auth.require("read"))],
                            since: Annotated[str | None, Query(max_length=64, description=(
                                "the version the client holds; absent, unknown here or too old: the full "
                                "document"))] = None) -> Response:
        async with building:
            # consoles polling together share one build: the state of 2,000 hosts is not cheap to read
            if feed.state is None or time.monotonic() - built_at[0] > FEED_REUSE_S:
                feed.record(await cluster_state(proxy_counters() if proxy_counters is not None else None))
                built_at[0] = time.monotonic()
        return Response(feed.since(since).model_dump_json(), media_type="application/json")

    @router.post("/api/v1/peer/heartbeat", response_model=PeerHeartbeat, responses=R404)
    async def peer_heartbeat(hb: PeerHeartbeat,
                             who: Annotated[Principal, Depends(auth.require("peer"))]) -> PeerHeartbeat:
        if not who.speaks_for_dispatcher(hb.name):
            raise ApiError(403, f"peer token {who.name!r} is for dispatcher {who.dispatcher!r}, not {hb.name!r}")
        if hb.name not in dispatcher_names:
            raise ApiError(404, f"unknown dispatcher {hb.name!r}")
        return peers.received(hb)

    return router

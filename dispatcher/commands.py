"""Staff commands to agents (restart / stop / start a supervised process).

Hosts need no inbound port: each agent long-polls its queue in Redis through whichever dispatcher
it talks to, runs the command and posts the reply, which the staff request is waiting for.
"""

from __future__ import annotations

import logging
import uuid
from typing import cast

from redis.asyncio import Redis

from ctops.clock import now_ms
from ctops.keys import Keys
from ctops.opsapi import ProcessAction
from ctops.wire import CommandReply, CommandRequest

log = logging.getLogger("ctops.dispatcher.commands")

REPLY_TTL_S = 300
QUEUE_TTL_S = 3600


class CommandRelay:
    def __init__(self, redis_blocking: Redis, keys: Keys) -> None:
        # blocking pops need a client whose socket timeout outlasts the wait
        self.r, self.k = redis_blocking, keys

    async def send(self, host: str, process: str, action: ProcessAction, by: str,
                   wait_s: float) -> CommandReply | None:
        cmd = CommandRequest(id=uuid.uuid4().hex, action=action, process=process, by=by, ts_ms=now_ms())
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(self.k.commands(host), cmd.model_dump_json())
        pipe.expire(self.k.commands(host), QUEUE_TTL_S)
        await pipe.execute()
        got = await self.r.blpop([self.k.command_reply(cmd.id)], timeout=wait_s)
        if got is None:
            # withdraw it if the agent has not taken it yet, so it does not run late and surprise anyone
            await self.r.lrem(self.k.commands(host), 1, cmd.model_dump_json())
            return None
        try:
            return CommandReply.model_validate_json(got[1])
        except ValueError as exc:  # damaged in the store: the staff request still gets an answer
            log.error("the reply to command %s is damaged and was dropped: %s", cmd.id, str(exc).splitlines()[0])
            return CommandReply(ok=False, message="the agent answered, but its reply was damaged in the store; "
                                "check the process's state")

    async def next_for(self, host: str, wait_s: float) -> CommandRequest | None:
        if wait_s < 0.001:
            # BLPOP's timeout 0 (and anything under Redis's 1 ms resolution) means "wait forever"
            # one value without a count (redis-py types the list that a count returns too)
            raw = cast("bytes | str | None", await self.r.lpop(self.k.commands(host)))
        else:
            got = await self.r.blpop([self.k.commands(host)], timeout=wait_s)
            raw = got[1] if got is not None else None
        if raw is None:
            return None
        try:
            return CommandRequest.model_validate_json(raw)
        except ValueError as exc:
            # one damaged queue entry must not fail the agent's poll (a 500 every time); it is
            # dropped with a log line, and the staff request that queued it times out and says so
            log.error("a damaged command in the queue of %s was dropped: %s", host, str(exc).splitlines()[0])
            return None

    async def reply(self, cmd_id: str, reply: CommandReply) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(self.k.command_reply(cmd_id), reply.model_dump_json())
        pipe.expire(self.k.command_reply(cmd_id), REPLY_TTL_S)
        await pipe.execute()

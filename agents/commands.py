"""Fetches staff commands for this host by long-polling the ops API (hosts need no inbound port),
runs them through the watchdog and posts each result back."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from agents.http import HttpClient, HttpError
from agents.supervisor import Supervisor
from ctops.opsapi import AGENT_POLL_HTTP_S, AGENT_RESULT_HTTP_S, COMMAND_POLL_MS, WATCHDOG_COMMAND_S
from ctops.wire import CommandReply, CommandRequest

log = logging.getLogger("ctops.agent.commands")
WAIT_MS = COMMAND_POLL_MS


class CommandPoller:
    def __init__(self, host: str, urls: list[str], token: str, supervisor: Supervisor,
                 current: Callable[[], int]) -> None:
        self.host, self.urls, self.supervisor = host, urls, supervisor
        self.current = current  # the index of the dispatcher heartbeats reach, shared with the sender
        self.client = HttpClient(token, timeout=AGENT_POLL_HTTP_S)

    async def _execute(self, cmd: CommandRequest) -> CommandReply:
        fut = self.supervisor.command(cmd.process, cmd.action)
        try:
            message = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=WATCHDOG_COMMAND_S)
        except KeyError as exc:
            return CommandReply(ok=False, message=str(exc))
        except TimeoutError:
            return CommandReply(ok=False, message="the watchdog did not finish the command in time")
        log.info("%s %s by %s: %s", cmd.action, cmd.process, cmd.by, message)
        return CommandReply(ok=True, message=message)

    async def run(self) -> None:
        while True:
            url = self.urls[self.current() % len(self.urls)]
            try:
                status, body = await self.client.request(
                    "GET", f"{url}/api/v1/agents/{self.host}/commands?wait_ms={WAIT_MS}")
                if status != 200:
                    log.warning("command poll at %s: %s %s", url, status, body[:200].decode(errors="replace"))
                    await asyncio.sleep(1)
                    continue
                for raw in json.loads(body):
                    cmd = CommandRequest.model_validate(raw)
                    reply = await self._execute(cmd)
                    await self.client.request("POST", f"{url}/api/v1/agents/{self.host}/commands/{cmd.id}/result",
                                              reply.model_dump_json().encode(), timeout=AGENT_RESULT_HTTP_S)
            except (HttpError, ValueError) as exc:
                log.debug("command poll at %s failed: %s", url, exc)
                await asyncio.sleep(0.5)

    async def aclose(self) -> None:
        await self.client.aclose()

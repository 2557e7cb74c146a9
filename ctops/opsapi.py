"""The ops-API contract in one place: its actions, who may do them, its error shape and its timeouts.

The dispatcher serves this contract, and the one client (`ctops.opsclient`), the console, the agents
and the CLI speak it; all of them import it from here, so an action or a role rule changes in one
line and a test (tests/test_opsapi_contract.py) holds the dispatcher's routes to it.

Nothing here imports another ctops module: the wire models import from here, not the other way.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

API = "/api/v1"

# --- actions -----------------------------------------------------------------------------------
# what staff may do, per area; each is the last segment of a POST path (see ACTION_ROUTES)
ServerAction = Literal["drain", "disable", "enable"]
LeadershipAction = Literal["promote", "step-down"]
ProcessAction = Literal["restart", "stop", "start"]
ProviderAction = Literal["pin", "unpin", "disable", "enable"]
GroupAction = Literal["acknowledge", "resolve", "unresolve", "mute", "assign"]
QuarantineAction = Literal["discard", "restore"]

# a server action sets the server's admin state; its health decides the rest
AdminState = Literal["enabled", "draining", "disabled"]
ADMIN_FOR: dict[ServerAction, AdminState] = {"drain": "draining", "disable": "disabled", "enable": "enabled"}

# the POST route (under API) that takes each kind of action as its last path segment `{action}`
ACTION_ROUTES: dict[str, tuple[str, ...]] = {
    "/servers/{name}/{action}": get_args(ServerAction),
    "/dispatchers/{name}/{action}": get_args(LeadershipAction),
    "/hosts/{host}/processes/{process}/{action}": get_args(ProcessAction),
    "/llm/providers/{name}/{action}": get_args(ProviderAction),
    "/exceptions/groups/{gid}/{action}": get_args(GroupAction),
    "/store/quarantine/{qid}/{action}": get_args(QuarantineAction),
}

# --- roles -------------------------------------------------------------------------------------
# A token has one role; a route asks for one grant. `act` is every staff action above (each is
# audited); `read` every GET a person uses; `agent` a host's heartbeats, command polls and results
# (only for the token's own host); `ingest` sending exceptions; `peer` the dispatchers' heartbeat;
# `metrics` GET /metrics, which a Prometheus server holds as `scrape`, a token that reads nothing else.
Role = Literal["agent", "peer", "viewer", "operator", "scrape"]
Grant = Literal["read", "act", "agent", "ingest", "peer", "metrics"]
ROLE_GRANTS: dict[Role, frozenset[Grant]] = {
    "agent": frozenset({"agent", "ingest"}),
    "peer": frozenset({"peer"}),
    "viewer": frozenset({"read", "metrics"}),
    # an operator may do everything a viewer may
    "operator": frozenset({"read", "act", "metrics"}),
    "scrape": frozenset({"metrics"}),
}
METRICS_PATH = "/metrics"  # where Prometheus looks by default, on the ops port (not under API)
ACTION_GRANT: Grant = "act"


def role_may(role: str, grant: str) -> bool:
    """What the role allows, before any scope (an agent's host, a peer's name) narrows it."""
    return any(r == role and grant in grants for r, grants in ROLE_GRANTS.items())


# --- errors ------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every error the ops API answers, whatever the route or the cause, so clients show it without guessing.

    `error` is one line for a person; `detail` is optional structure (the invalid fields of a 422,
    `{"needs": grant}` on a 403, `{"retry_after_s": n}` on a 429...).
    """

    model_config = ConfigDict(extra="forbid")

    error: str
    detail: object | None = None


def error_body(error: str, detail: object | None = None) -> dict[str, object]:
    return {"error": error, "detail": detail}


# --- timeouts ----------------------------------------------------------------------------------
# Each wait is set by the one it waits on, so a slow inner step ends in that step's own clear answer
# (the agent's "did not finish", the dispatcher's 504) instead of an outer caller giving up first with
# "may or may not have happened". Inner to outer:
#
#   agent's watchdog runs the command     WATCHDOG_COMMAND_S      12 s
#   < ops API waits for the agent's reply COMMAND_WAIT_S          15 s  (+ the reply's trip back)
#   < console waits for the ops API       PROCESS_ACTION_S        25 s  (+ a loaded dispatcher's slack)
#
#   agent's long poll for commands        COMMAND_POLL_S          20 s
#   < ops API's cap on a long poll        COMMAND_POLL_MAX_S      30 s  (an agent's own poll always fits)
#   = agent's HTTP timeout on its poll    AGENT_POLL_HTTP_S       30 s  (it hears "nothing" before giving up)
#   < dispatcher's blocking Redis socket  REDIS_BLOCKING_S        40 s  (a BLPOP of the longest wait
#                                                                         never times its socket out)
#
#   ops API moves the store's primary     STORE_FAILOVER_WAIT_S   15 s
#   < console waits for it                STORE_FAILOVER_S        25 s
#   ops API moves leadership              3 lease TTLs (1 s by default; the deployment sets it)
#   < console waits for it                LEADERSHIP_S            15 s  (covers TTLs up to 4 s)
#   an LLM pool action is a Redis write   PROVIDER_ACTION_S       10 s
SLACK_S = 10.0  # an outer wait's margin over the inner one: a loaded 2-core host stalls for seconds

WATCHDOG_COMMAND_S = 12.0  # a restart is a graceful stop (3 s grace by default, then SIGKILL) and a start
COMMAND_WAIT_S = WATCHDOG_COMMAND_S + 3.0
PROCESS_ACTION_S = COMMAND_WAIT_S + SLACK_S

COMMAND_POLL_S = 20.0  # how long an idle agent's poll is held: one request per host per 20 s
COMMAND_POLL_MAX_S = COMMAND_POLL_S + SLACK_S
AGENT_POLL_HTTP_S = COMMAND_POLL_S + SLACK_S
COMMAND_POLL_MS, COMMAND_POLL_MAX_MS = int(COMMAND_POLL_S * 1000), int(COMMAND_POLL_MAX_S * 1000)  # wait_ms
AGENT_RESULT_HTTP_S = SLACK_S  # posting a command's result is one Redis push
REDIS_BLOCKING_S = max(COMMAND_POLL_MAX_S, COMMAND_WAIT_S) + SLACK_S

STORE_FAILOVER_WAIT_S = 15.0  # Sentinels promote a replica in ~2-3 s; 15 s covers a slow election
STORE_FAILOVER_S = STORE_FAILOVER_WAIT_S + SLACK_S
LEASE_TTLS_TO_MOVE = 3  # the ops API waits this many lease TTLs for leadership to move
LEADERSHIP_S = 15.0
PROVIDER_ACTION_S = SLACK_S

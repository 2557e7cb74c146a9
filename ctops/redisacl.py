"""Who may do what in the shared state: one Redis ACL user per role.

Learner code runs on the trainers' machines, so a trainer's credentials are treated as the first
thing an attacker gets: the trainer user reaches only the keys `trainer/` uses and, like every
service user, no command that reconfigures, persists, replicates, flushes or stops Redis.
The launcher (`ctops_tools.redis_embed`) writes these rules into every node's ACL file; an operator
running their own Redis prints them with `python -m ctops.redisacl --prefix PREFIX`.
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Literal

ServiceRole = Literal["trainer", "dispatcher"]

# key patterns (after "{prefix}:") of everything in ctops.keys.Keys that trainer/ touches
TRAINER_KEYS = ("session:*", "submission:*", "submissions:open", "reviews:pending", "idempotency:*",
                "trainer:*", "server:*:sessions", "store:writes-unconfirmed",
                # damaged records a trainer found: set aside, logged and counted (ctops.integrity)
                "quarantine:*",
                # delivered data it refused, counted by source (ctops.rejects)
                "rejected")

# data commands only; the denials after them win, whatever category also lists a command
_SERVICE_COMMANDS = ["-@all", "+@read", "+@write", "+@keyspace", "+@string", "+@hash", "+@list", "+@set",
                     "+@sortedset", "+@stream", "+@bitmap", "+@hyperloglog", "+@scripting", "+@transaction",
                     "+@connection", "+@fast", "-@admin", "-@dangerous",
                     # named as well, so a future category change cannot silently allow them
                     "-config", "-debug", "-save", "-bgsave", "-bgrewriteaof", "-module", "-flushall", "-flushdb",
                     "-shutdown", "-replicaof", "-slaveof", "-acl", "-keys", "-monitor", "-sync", "-psync",
                     "-failover", "-migrate", "-restore", "-swapdb", "-client"]

# what Sentinel needs on the nodes it monitors (redis.io, "Redis Access Control List authentication")
SENTINEL_RULES = ["allchannels", "+multi", "+slaveof", "+replicaof", "+ping", "+exec", "+subscribe",
                  "+config|rewrite", "+role", "+publish", "+info", "+client|setname", "+client|kill",
                  "+script|kill"]
REPLICA_RULES = ["+psync", "+replconf", "+ping"]
ADMIN_RULES = ["~*", "&*", "+@all"]


def glob_escape(text: str) -> str:
    """A literal for Redis glob patterns (test prefixes carry brackets from parametrized names)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def service_rules(role: ServiceRole, prefix: str) -> list[str]:
    p = glob_escape(prefix)
    if role == "trainer":
        keys = [f"~{p}:{k}" for k in TRAINER_KEYS]
        extra: list[str] = []
    else:
        keys = [f"~{p}:*"]
        # the dispatcher reports the store's replication state (INFO replication, ROLE), and puts a
        # quarantined record back for staff exactly as it was set aside: RESTORE of the DUMP it kept,
        # only ever under its own prefix (the key pattern above)
        extra = ["+info", "+role", "+restore"]
    return ["resetkeys", "resetchannels", *keys, f"&{p}:*", *_SERVICE_COMMANDS, *extra]


def acl_line(username: str, password: str, rules: list[str]) -> str:
    """One ACL-file line; the file holds only the password's SHA-256."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return " ".join(["user", username, "on", "resetpass", f"#{digest}", *rules])


def setuser_args(username: str, password: str, rules: list[str]) -> list[str]:
    """The same user as ACL SETUSER arguments, for a running node."""
    return [username, "reset", "on", f"#{hashlib.sha256(password.encode()).hexdigest()}", *rules]


def main() -> None:  # pragma: no cover - an operator's helper
    ap = argparse.ArgumentParser(description="print the ACL rules of the ctops service users")
    ap.add_argument("--prefix", default="ctops")
    args = ap.parse_args()
    for role in ("trainer", "dispatcher"):
        print(f"ACL SETUSER ctops-{role} on >PASSWORD " + " ".join(service_rules(role, args.prefix)))
    print("ACL SETUSER ctops-admin on >PASSWORD " + " ".join(ADMIN_RULES))
    print("ACL SETUSER ctops-replica on >PASSWORD " + " ".join(REPLICA_RULES))
    print("ACL SETUSER ctops-sentinel on >PASSWORD " + " ".join(SENTINEL_RULES))
    print("ACL SETUSER default off")


if __name__ == "__main__":
    main()

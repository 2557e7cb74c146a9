"""The exit codes every `ctops` subcommand uses, so a script can tell the cluster's trouble from
its own (README, "Exit codes"), and the one wording of a refused token.

`ctops status` is a monitoring check and stays within the plugin range 0-3: no dispatcher
answering is the cluster's outage (CRITICAL), a refused token or unreadable state file says nothing
about the cluster (UNKNOWN)."""

from __future__ import annotations

import argparse
import os

OK = 0
DEGRADED = 1  # status: degraded; other commands: the action was refused or failed (for some targets)
FAILED = 1
CRITICAL = 2  # status: critical; other commands: usage (bad arguments, deployment or state file)
USAGE = 2
UNREACHABLE = 3  # no dispatcher answered (status: UNKNOWN, for a refused token or unreadable state file)
UNKNOWN = 3
AUTH = 4  # the token was refused (401) or its role may not do this (403)


def token_source(args: argparse.Namespace, role: str) -> str:
    """Where the token a command sent came from, in words, to name it when it is refused."""
    if getattr(args, "token", None):
        return "the token given with --token"
    if os.environ.get("CTOPS_TOKEN"):
        return "the token in $CTOPS_TOKEN"
    if getattr(args, "url", None):
        return "no token (none given with --token or $CTOPS_TOKEN)"
    return f"the {role} token of the state file {getattr(args, 'state_file', '?')}"


HOW_TO_PASS = "pass one with --token TOKEN or the CTOPS_TOKEN environment variable (or --state-file of a demo)"


def refused(status: int, error: str, source: str, needed_role: str = "viewer") -> str:
    """A 401 or 403 as a sentence that says which token and how to pass another."""
    if status == 401:
        return f"{source} was refused ({error}); {HOW_TO_PASS}"
    return f"{source} may not do this ({error}); it needs a token with the {needed_role} role: {HOW_TO_PASS}"

"""Hardening for the trainer's process; serving itself is ctops.serving.run_foreground, shared by every ctops server."""

from __future__ import annotations

import ctypes

PR_SET_DUMPABLE = 4


def harden() -> None:
    """Non-dumpable: a child running as the same uid then cannot read /proc/<our pid>/environ or
    attach to us, whatever a learner's code tries."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)

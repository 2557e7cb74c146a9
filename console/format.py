"""How cluster data becomes table rows: pure functions, so tables only compare and render.

Each table has columns (key, label, width, renderer) and a `*_raw` function giving the values a
row shows; the tables diff those tuples, not rendered Text. The raw functions run in a worker
thread (console.prepare), so the event loop only compares tuples and renders what changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import cast

from rich.text import Text

from ctops.wire import (
    DispatcherView,
    Event,
    HostView,
    LLMProviderView,
    ProcessMetrics,
    QuarantinedRecord,
    ServerView,
    StoreView,
)

# the glyph and the word carry the state without colour (NO_COLOR, monochrome terminals);
# colours are base ANSI names so they survive 256- and 16-colour terminals
STATE_STYLE: dict[str, tuple[str, str]] = {
    "up": ("●", "green"),
    "suspect": ("▲", "bold yellow"),
    "down": ("✖", "bold red"),
    "draining": ("◐", "blue"),
    "disabled": ("○", "dim"),
}

DIAGNOSIS_STYLE: dict[str, tuple[str, str]] = {
    "ok": ("", "dim"),
    "software fault": ("software fault", "bold red"),
    "host or network down": ("host/net down", "bold red"),
    "agent fault": ("agent fault", "yellow"),
    "starting": ("starting", "cyan"),
    "admin": ("admin", "dim"),
    "shared state unavailable": ("store away", "bold yellow"),
}

PROCESS_STYLE: dict[str, tuple[str, str]] = {
    "running": ("●", "green"),
    "starting": ("◌", "cyan"),
    "backoff": ("▲", "bold yellow"),
    "stopped": ("○", "dim"),
    "fatal": ("✖", "bold red"),
    "unknown": ("?", "dim"),  # its host is lost: what the agent last said is no longer known to be true
}

PROVIDER_STYLE: dict[str, tuple[str, str]] = {
    "up": ("●", "green"),
    "healthy": ("●", "green"),
    "degraded": ("▲", "bold yellow"),
    "rate_limited": ("◐", "yellow"),
    "down": ("✖", "bold red"),
    "disabled": ("○", "dim"),
}

SEVERITY_STYLE: dict[str, tuple[str, str]] = {
    "info": ("·", "dim"),
    "warning": ("▲", "yellow"),
    "critical": ("✖", "bold red"),
}

HOST_STYLE: dict[str, str] = {"alive": "green", "late": "bold yellow", "lost": "bold red"}

Raw = tuple[object, ...]
Render = Callable[[object], Text]
_DIGITS = re.compile(r"(\d+)")
LOCAL_TZ: tzinfo | None = None  # None: the machine's zone; tests pin it for stable snapshots


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: Text
    width: int  # fixed: cells never trigger a width recomputation over all rows
    render: Render


# --- cell renderers --------------------------------------------------------------------------------

def _bold(v: object) -> Text:
    return Text(str(v), style="bold")


def _plain(v: object) -> Text:
    return Text("" if v is None else str(v), no_wrap=True, overflow="ellipsis")


def _int(v: object) -> Text:
    return Text("—" if v is None else str(v), justify="right", style="dim" if v is None else "")


def _state(v: object) -> Text:
    glyph, style = STATE_STYLE.get(str(v), ("?", ""))
    return Text(f"{glyph} {v}", style=style)


def _diagnosis(v: object) -> Text:
    label, style = DIAGNOSIS_STYLE.get(str(v), (str(v), ""))
    return Text(label, style=style, no_wrap=True, overflow="ellipsis")


def _age(v: object) -> Text:
    """Tenths of a second (see bucket_age); below 2 s a heartbeat is simply fresh."""
    if v is None:
        return Text("—", justify="right", style="dim")
    tenths = int(v)  # type: ignore[call-overload]
    if tenths < 20:
        return Text("<2s", justify="right")
    secs = tenths / 10
    if secs < 10:
        label = f"{secs:.1f}s"
    elif secs < 120:
        label = f"{secs:.0f}s"
    else:
        label = f"{secs / 60:.0f}m"
    return Text(label, justify="right", style="bold red" if secs >= 5 else "yellow")


def _percent(v: object) -> Text:
    if v is None:
        return Text("—", justify="right", style="dim")
    p = int(v)  # type: ignore[call-overload]
    return Text(f"{p}%", justify="right", style="bold red" if p >= 90 else "yellow" if p >= 75 else "")


def _error(v: object) -> Text:
    if v is None:
        return Text("")
    message, historical = cast("tuple[object, object]", v)
    return Text(str(message), style="dim" if historical else "red", no_wrap=True, overflow="ellipsis")


def _detail(v: object) -> Text:
    """Plain text, or (text, True) for what is only last known: dimmed."""
    if isinstance(v, tuple):
        return Text(str(v[0]), style="dim italic", no_wrap=True, overflow="ellipsis")
    return _plain(v)


def _host_state(v: object) -> Text:
    return Text(str(v), style=HOST_STYLE.get(str(v), ""))


def _process_state(v: object) -> Text:
    if v is None:
        return Text("—", style="dim")
    glyph, style = PROCESS_STYLE.get(str(v), ("?", ""))
    return Text(f"{glyph} {v}", style=style)


def _bytes(v: object) -> Text:
    if v is None:
        return Text("—", justify="right", style="dim")
    mib = int(v)  # type: ignore[call-overload]  # already MiB
    return Text(f"{mib}M" if mib < 10_000 else f"{mib / 1024:.0f}G", justify="right")


def _ms(v: object) -> Text:
    if v is None:
        return Text("—", justify="right", style="dim")
    ms = float(v)  # type: ignore[arg-type]
    label = f"{ms:.0f}ms" if ms < 10_000 else f"{ms / 1000:.0f}s"
    return Text(label, justify="right", style="yellow" if ms >= 1000 else "")


def _watchdog(v: object) -> Text:
    if v is None:
        return Text("—", style="dim")
    dead, generation, restarts = cast("tuple[object, object, object]", v)
    if dead:  # the names of the dead threads: never read as "ok"
        return Text(f"✖ {dead} (gen {generation})", style="bold red", no_wrap=True, overflow="ellipsis")
    tail = f" ({restarts} restarts)" if restarts else ""
    return Text(f"ok gen {generation}{tail}", style="green" if not restarts else "yellow", no_wrap=True,
                overflow="ellipsis")


def _role(v: object) -> Text:
    if v == "leader":
        return Text("★ leader", style="bold green")
    if v == "standby":
        return Text("◇ standby", style="")
    return Text("? unknown", style="bold yellow")


def _healthy(v: object) -> Text:
    return Text("healthy", style="green") if v else Text("UNHEALTHY", style="bold reverse red")


def _provider_state(v: object) -> Text:
    glyph, style = PROVIDER_STYLE.get(str(v), ("?", ""))
    return Text(f"{glyph} {v}", style=style)


def _breaker(v: object) -> Text:
    style = {"closed": "green", "open": "bold red", "half_open": "yellow", "half-open": "yellow"}.get(str(v), "")
    return Text(str(v).replace("_", "-"), style=style)


def _flags(v: object) -> Text:
    pinned, disabled = cast("tuple[object, object]", v)
    parts = []
    if pinned:
        parts.append(("pinned", "bold cyan"))
    if disabled:
        parts.append(("disabled", "dim"))
    return Text.assemble(*_spaced(parts)) if parts else Text("")


def _rate(v: object) -> Text:
    if v is None:
        return Text("—", justify="right", style="dim")
    p = float(v)  # type: ignore[arg-type]  # percent
    return Text(f"{p:.1f}%", justify="right", style="bold red" if p >= 20 else "yellow" if p >= 5 else "")


def _spaced(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if i:
            out.append((" ", ""))
        out.append(item)
    return out


def _r(label: str) -> Text:
    return Text(label, justify="right")


# --- servers ---------------------------------------------------------------------------------------

SERVER_COLUMNS: tuple[Column, ...] = (
    # Server..Host fit 80 columns (diagnosis included); the detail shows on wider terminals or by scrolling
    Column("name", Text("Server"), 13, _bold),
    Column("state", Text("State"), 10, _state),
    Column("diagnosis", Text("Diagnosis"), 14, _diagnosis),
    Column("heartbeat", _r("HB age"), 6, _age),
    Column("cpu", _r("CPU"), 4, _percent),
    Column("memory", _r("Mem"), 4, _percent),
    Column("sessions", _r("Sess"), 4, _int),
    Column("host", Text("Host"), 9, _plain),
    Column("error", Text("Detail / last error"), 48, _error),
)


def bucket_age(ms: int | None) -> int | None:
    # the cell only changes when its text would: everything under 2 s is one bucket ("<2s"),
    # tenths up to 10 s, whole seconds above
    if ms is None:
        return None
    if ms < 2000:
        return 0
    return ms // 100 if ms < 10_000 else (ms // 1000) * 10


def ago(ms: int | None) -> str:
    """An age in the coarsest unit that still tells staff whether it is news: 12s, 3m, 2h, 4d."""
    if ms is None:
        return "?"
    secs = max(ms, 0) // 1000
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if secs >= size * (2 if unit != "m" else 1):
            return f"{secs // size}{unit}"
    return f"{secs}s"


def server_raw(s: ServerView, now_ms: int | None = None) -> Raw:
    """The values a row shows, in column order; the table diffs these, not the rendered Text.

    Only what is true now: the last health-check error of a server that answers again is history
    (often the refused connection of its start-up), so it is not shown; a current one carries its age."""
    details = []
    if s.diagnosis not in ("ok", "admin") and s.diagnosis_detail:
        details.append(s.diagnosis_detail)
    if s.last_error and s.health != "up":
        since = f" (for {ago(now_ms - s.since_ms)})" if now_ms is not None and s.since_ms else ""
        details.append(s.last_error + since)
    return (
        s.name,
        s.state,
        s.diagnosis,
        bucket_age(s.heartbeat_age_ms),
        None if s.cpu_percent is None else round(s.cpu_percent),
        None if s.memory_percent is None else round(s.memory_percent),
        s.active_sessions,
        s.host,
        (" · ".join(details), False) if details else None,
    )


# --- hosts and their supervised processes ----------------------------------------------------------

PROCESS_COLUMNS: tuple[Column, ...] = (
    Column("host", Text("Host"), 10, _bold),
    Column("host_state", Text("Agent"), 5, _host_state),
    Column("process", Text("Process"), 12, _plain),
    Column("state", Text("State"), 10, _process_state),
    Column("pid", _r("PID"), 7, _int),
    Column("restarts", _r("Rst"), 3, _int),
    Column("cpu", _r("CPU"), 4, _percent),
    Column("rss", _r("RSS"), 5, _bytes),
    Column("check", _r("Check"), 6, _ms),
    Column("watchdog", Text("Watchdog"), 24, _watchdog),
    Column("last_exit", Text("Last exit"), 40, _detail),
)


def process_key(host: str, process: str | None) -> str:
    return f"{host}/{process or ''}"


def split_process_key(key: str) -> tuple[str, str | None]:
    host, _, process = key.partition("/")
    return host, process or None


def _watchdog_raw(h: HostView) -> object:
    """(the dead threads' names, or None while both run; generation; restarts)."""
    w = h.watchdog
    if w is None:
        return None
    dead = [n for n, alive in (("checker", w.checker_alive), ("guard", w.guard_alive)) if not alive]
    return (" and ".join(dead) + " dead" if dead else None, w.generation, w.thread_restarts + w.loop_restarts)


def process_raw(h: HostView, p: ProcessMetrics | None, watchdog: object) -> Raw:
    if p is None:
        return (h.name, h.state, None, None, None, None, None, None, None, watchdog, None)
    if h.state == "lost":
        # its agent is silent: the last report is not the present; say so and label it as the last known
        pid = f", pid {p.pid}" if p.pid else ""
        last = (f"last known {ago(h.heartbeat_age_ms)} ago: {p.state}{pid}, cpu {round(p.cpu_percent)}%, "
                f"rss {p.rss_bytes >> 20}M" + (f"; {p.last_exit}" if p.last_exit else ""))
        return (h.name, h.state, p.name, "unknown", None, None, None, None, None, None, (last, True))
    return (
        h.name, h.state, p.name, p.state, p.pid, p.restarts, round(p.cpu_percent), p.rss_bytes >> 20,
        None if p.check_latency_ms is None else round(p.check_latency_ms), watchdog, _with_spare(p),
    )


def _with_spare(p: ProcessMetrics) -> str | None:
    """The last exit, after the warm spare's state for a process configured with one."""
    sp = p.spare
    if sp is None:
        return p.last_exit
    spare = f"spare {sp.state.replace('_', ' ')}" + (f" {sp.pid}" if sp.pid else "")
    return f"{spare}; {p.last_exit}" if p.last_exit else spare


def host_rows(hosts: list[HostView]) -> dict[str, Raw]:
    rows: dict[str, Raw] = {}
    for h in hosts:
        w = _watchdog_raw(h)
        if not h.processes:
            rows[process_key(h.name, None)] = process_raw(h, None, w)
        for p in h.processes:
            rows[process_key(h.name, p.name)] = process_raw(h, p, w)
    return rows


# --- dispatchers -----------------------------------------------------------------------------------

DISPATCHER_COLUMNS: tuple[Column, ...] = (
    Column("name", Text("Dispatcher"), 10, _bold),
    Column("role", Text("Role"), 9, _role),
    Column("healthy", Text("Health"), 9, _healthy),
    Column("epoch", _r("Epoch"), 5, _int),
    Column("lease", _r("Lease"), 6, _ms),
    Column("peer", _r("Peer HB"), 7, _ms),
    Column("ops_url", Text("Ops API"), 26, _plain),
)


def _coarse_ms(ms: int | None) -> int | None:
    # lease and peer heartbeat ages tick every few hundred ms: show them in 100 ms steps
    return None if ms is None else (ms // 100) * 100


def dispatcher_raw(d: DispatcherView) -> Raw:
    return (d.name, d.role, d.healthy, d.epoch, _coarse_ms(d.lease_age_ms), _coarse_ms(d.peer_heartbeat_age_ms),
            d.ops_url)


# --- LLM providers ---------------------------------------------------------------------------------

PROVIDER_COLUMNS: tuple[Column, ...] = (
    Column("name", Text("Provider"), 11, _bold),
    Column("priority", _r("Prio"), 4, _int),
    Column("state", Text("State"), 12, _provider_state),
    Column("breaker", Text("Breaker"), 9, _breaker),
    Column("flags", Text("Routing"), 8, _flags),
    Column("p50", _r("p50"), 6, _ms),
    Column("p99", _r("p99"), 6, _ms),
    Column("errors", _r("Errors"), 6, _rate),
    Column("requests", _r("Requests"), 8, _int),
    Column("model", Text("Model"), 16, _plain),
    Column("last_error", Text("Last error"), 40, _plain),
)


def provider_raw(p: LLMProviderView) -> Raw:
    return (
        p.name, p.priority, p.state, p.breaker, (p.pinned, p.disabled),
        None if p.p50_ms is None else round(p.p50_ms), None if p.p99_ms is None else round(p.p99_ms),
        round(p.error_rate * 100, 1), p.requests, p.model, p.last_error,
    )


# --- the shared store (Redis) ----------------------------------------------------------------------

NODE_STYLE: dict[str, tuple[str, str]] = {
    "up": ("●", "green"),
    "syncing": ("◐", "yellow"),
    "down": ("✖", "bold red"),
    "unknown": ("?", "dim"),
}
ROLE_STYLE: dict[str, str] = {"primary": "bold green", "replica": "", "sentinel": "dim"}


def _node_state(v: object) -> Text:
    glyph, style = NODE_STYLE.get(str(v), ("?", ""))
    return Text(f"{glyph} {v}", style=style)


def _node_role(v: object) -> Text:
    return Text(("★ " if v == "primary" else "") + str(v), style=ROLE_STYLE.get(str(v), ""))


STORE_COLUMNS: tuple[Column, ...] = (
    Column("name", Text("Node"), 16, _bold),
    Column("role", Text("Role"), 10, _node_role),
    Column("state", Text("State"), 10, _node_state),
    Column("lag", _r("Lag"), 7, _ms),
    Column("address", Text("Address"), 22, _plain),
)


def store_rows(store: StoreView | None) -> dict[str, Raw]:
    """Primary first, then replicas and Sentinels, as the serving dispatcher last saw them."""
    if store is None:
        return {}
    rows: dict[str, Raw] = {}
    if store.primary is not None:
        rows[store.primary] = (store.primary, "primary", "up" if store.available else "down", None, None)
    for r in store.replicas:
        rows[r.name] = (r.name, "replica", r.state, r.lag_ms, r.address)
    for s in store.sentinels:
        rows[s.name] = (s.name, "sentinel", s.state, None, s.address)
    return rows


def store_summary(store: StoreView | None) -> Text:
    if store is None:
        return Text("This dispatcher reports no store status (an older version?).", style="yellow")
    parts: list[tuple[str, str]] = [("Store ", ""), (store.mode, "bold"), (" · primary ", ""),
                                    (store.primary or "NONE", "bold" if store.primary else "bold reverse red")]
    parts.append((" · ", ""))
    parts.append(("available", "green") if store.available else ("UNAVAILABLE", "bold reverse red"))
    if store.failover_in_progress:
        parts += [(" · ", ""), ("failover in progress", "bold yellow")]
    when = "never seen" if store.last_failover_ms is None else datetime.fromtimestamp(
        store.last_failover_ms / 1000, LOCAL_TZ).strftime("%Y-%m-%d %H:%M:%S")
    parts += [("\nLast failover ", ""), (when, "bold"), (" · writes unconfirmed ", ""),
              (str(store.writes_unconfirmed), "bold yellow" if store.writes_unconfirmed else "bold")]
    if store.corrupt_found or store.last_scrub_ms is not None:
        scrub = "not yet" if store.last_scrub_ms is None else f"{store.last_scrub_ms / 1000:.1f} s"
        parts += [("\nDamaged records found ", ""),
                  (str(store.corrupt_found), "bold red" if store.corrupt_found else "bold"),
                  (" · repaired ", ""), (str(store.repaired), "bold"), (" · last full check took ", ""),
                  (scrub, "bold")]
        if store.corrupt_found > store.repaired:
            parts.append(("  (set aside: see Quarantined below)", "dim"))
    if store.diagnosis:
        parts += [("\n", ""), (store.diagnosis, "bold red" if not store.available else "yellow")]
    elif store.error:
        parts += [("\n", ""), (store.error, "dim")]
    return Text.assemble(*parts)


# --- quarantined records (damaged records set aside, ctops/integrity.py) -----------------------------

def _clock(v: object) -> Text:
    if not v:
        return Text("—", style="dim")
    return Text(datetime.fromtimestamp(int(v) / 1000, LOCAL_TZ).strftime("%m-%d %H:%M:%S"))  # type: ignore[call-overload]


def _outcome(v: object) -> Text:
    return Text(str(v), style="green" if v == "repaired" else "bold yellow")


QUARANTINE_COLUMNS: tuple[Column, ...] = (
    # kind, key and outcome fit 80 columns; the rest shows on wider terminals or by scrolling
    Column("kind", Text("Kind"), 11, _plain),
    Column("key", Text("Key"), 32, _plain),
    Column("outcome", Text("Outcome"), 9, _outcome),
    Column("reason", Text("Reason"), 12, _plain),
    Column("at", Text("Set aside"), 14, _clock),
    Column("session", Text("Session"), 14, _plain),
    Column("qid", Text("Quarantine id"), 24, _plain),
)


def quarantine_rows(items: list[QuarantinedRecord]) -> dict[str, Raw]:
    """Keyed by quarantine id, which starts with when it was set aside: the oldest comes first."""
    return {q.qid: (q.kind, q.key, q.outcome, q.reason, q.at_ms, q.session or None, q.qid) for q in items}


# --- events ----------------------------------------------------------------------------------------

def event_line(e: Event, wrap: bool = False) -> Text:
    """One event; `wrap`: the whole message over as many lines as the width needs (else cut with …)."""
    glyph, style = SEVERITY_STYLE.get(e.severity, ("?", ""))
    stamp = datetime.fromtimestamp(e.ts_ms / 1000, LOCAL_TZ).strftime("%H:%M:%S")
    target = e.target or ""
    return Text.assemble(
        (stamp, "dim"), " ", (f"{glyph} {e.kind:<18}", style), " ", (f"{target:<12}", "bold"), " ", e.message,
        (f"  ({e.source})", "dim"), no_wrap=not wrap, overflow="fold" if wrap else "ellipsis",
    )


def event_detail(e: Event) -> Text:
    """Every field of an event, the message in full."""
    glyph, style = SEVERITY_STYLE.get(e.severity, ("?", ""))
    when = datetime.fromtimestamp(e.ts_ms / 1000, LOCAL_TZ).strftime("%Y-%m-%d %H:%M:%S")
    return Text.assemble(
        ("When      ", "dim"), when, "\n", ("Severity  ", "dim"), (f"{glyph} {e.severity}", style), "\n",
        ("Kind      ", "dim"), (e.kind, "bold"), "\n", ("Target    ", "dim"), (e.target or "—", "bold"), "\n",
        ("Source    ", "dim"), e.source, "\n", ("Event id  ", "dim"), f"{e.event_id} (stream {e.id})", "\n\n",
        e.message,
    )


# --- errors as sentences ------------------------------------------------------------------------------

def error_sentence(error: str, detail: object | None = None) -> str:
    """An ops API error ({"error", "detail"}) as one sentence for a person: never a raw dict or list."""
    text = error.strip().rstrip(".") or "error"
    extra = _detail_words(detail)
    if extra:
        text += f": {extra}"
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def _detail_words(detail: object | None) -> str:
    if detail is None or detail == "":
        return ""
    if isinstance(detail, dict):
        if set(detail) == {"needs"}:  # a 403 says the grant it needs
            return f"that needs the '{detail['needs']}' grant"
        return "; ".join(f"{str(k).replace('_', ' ')} {_detail_words(v)}" for k, v in detail.items())
    if isinstance(detail, list | tuple):
        return "; ".join(_detail_words(d) for d in detail)
    return str(detail)


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """trainer-2 sorts before trainer-10."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in _DIGITS.split(name) if t)


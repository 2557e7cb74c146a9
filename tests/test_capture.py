"""Capture in a service: what an event holds, that capturing never breaks the service, log tailing,
and end to end: exceptions raised in a real trainer while its dispatcher is down all arrive, once."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.logtail import LogTail
from ctops import capture
from ctops.capture import Capture, loop_exception_handler
from ctops.capture.fingerprint import fingerprint
from ctops.capture.forwarder import Forwarder
from ctops.capture.wire import ExceptionEvent
from tests.cluster import Cluster, wait_for


def make_capture(**kw: Any) -> Capture:
    fw = Forwarder([], None, None, sender="test")  # not started: events stay queued for the test to read
    return Capture("svc", "host-x", fw, context={"server": "s1"}, **kw)


def queued(cap: Capture) -> list[dict[str, Any]]:
    return [json.loads(p) for p in cap.forwarder.queue]


def parse_order(raw: str) -> int:
    return int(raw)  # the line the test expects in the traceback


def test_an_exception_event_has_type_message_frames_and_context() -> None:
    cap = make_capture()
    try:
        parse_order("twelve")
    except ValueError as exc:
        eid = cap.capture_exception(exc, context={"order": 7})
    [ev] = queued(cap)
    ExceptionEvent.model_validate(ev)  # what the dispatcher will accept
    assert ev["event_id"] == eid and ev["service"] == "svc" and ev["host"] == "host-x"
    assert ev["type"] == "ValueError" and "twelve" in ev["message"]
    assert ev["context"] == {"server": "s1", "order": 7}
    inner = ev["frames"][-1]
    assert inner["function"] == "parse_order" and inner["module"] == "tests.test_capture" and inner["in_app"]
    assert inner["context_line"] == "return int(raw)  # the line the test expects in the traceback"
    assert ev["frames"][-2]["function"] == "test_an_exception_event_has_type_message_frames_and_context"


def test_logging_handler_captures_errors_once_per_exception() -> None:
    cap = make_capture()
    logger = logging.getLogger("svc.test")
    logger.addHandler(cap.handler())
    logger.propagate = False
    try:
        try:
            {}["missing"]
        except KeyError:
            logger.exception("lookup failed for %s", "missing")
            logger.error("and again", exc_info=True)  # same exception object: not a second event
        logger.warning("only a warning")
        logger.error("user %d not found", 17)
        logger.error("user %d not found", 18)
    finally:
        logger.handlers.clear()
        logger.propagate = True
    evs = queued(cap)
    assert [e["type"] for e in evs] == ["KeyError", "log.ERROR", "log.ERROR"]
    assert evs[0]["context"]["log_message"] == "lookup failed for missing" and evs[0]["logger"] == "svc.test"
    assert evs[1]["message"] == "user 17 not found" and evs[1]["context"]["log_template"] == "user %d not found"
    fps = {fingerprint(e["type"], e["frames"], e["message"], e["logger"]) for e in evs[1:]}
    assert len(fps) == 1  # one log call site, two values: one group


def test_capture_never_raises_into_the_service() -> None:
    cap = make_capture()

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert cap.capture_exception(Unprintable()) is None
    assert cap.internal_errors == 1
    cap.forwarder.submit = lambda p: (_ for _ in ()).throw(OSError("boom"))  # type: ignore[method-assign]
    try:
        raise KeyError("x")
    except KeyError as exc:
        assert cap.capture_exception(exc) is None
    assert cap.internal_errors == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_threads_and_asyncio_tasks_are_captured(tmp_path: Path) -> None:
    cap = capture.install("svc", "host-y", [], None, tmp_path / "spool", hooks=True)
    try:
        t = threading.Thread(target=lambda: 1 / 0, name="worker-1")
        t.start()
        t.join()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(loop_exception_handler(cap))

            async def fails() -> None:
                raise LookupError("nobody awaited me")

            task = loop.create_task(fails())
            await asyncio.sleep(0.05)
            del task  # dropped unretrieved: asyncio reports it to the handler when collected
            import gc

            gc.collect()
            await asyncio.sleep(0.01)

        asyncio.run(main())
        assert cap.captured == 2
    finally:
        cap.close()
    assert capture.installed() is None
    lines = b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("*.seg")).splitlines()
    types = {json.loads(line.split(b" ", 2)[2])["type"] for line in lines}
    assert types == {"ZeroDivisionError", "LookupError"}  # no dispatcher configured: both spooled


# --- log tailing -------------------------------------------------------------------------------

class Collect:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def submit(self, payload: bytes) -> bool:
        self.events.append(json.loads(payload))
        return True


TRACEBACK = """2024-05-01 10:00:00 worker ERROR jobs: job 17 failed
Traceback (most recent call last):
  File "/srv/app/jobs/run.py", line 40, in run_job
    result = step(job)
  File "/srv/app/jobs/steps.py", line 12, in step
    return job["payload"]
KeyError: 'payload'
2024-05-01 10:00:01 worker INFO jobs: next
"""


def test_logtail_turns_tracebacks_and_error_lines_into_events(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("2024-05-01 09:00:00 worker ERROR old history, not news\n")
    sink = Collect()
    tail = LogTail("host-3", [str(tmp_path / "*.log")], sink, tmp_path / "state", interval=0.05)  # type: ignore[arg-type]
    tail.poll_once()
    assert sink.events == []
    with log.open("a") as f:
        f.write(TRACEBACK)
        f.write("2024-05-01 10:00:02 worker ERROR disk 91% full\n")
    tail.poll_once()
    [tb] = sink.events
    assert tb["type"] == "KeyError" and tb["message"] == "'payload'" and tb["host"] == "host-3"
    assert [(f["function"], f["lineno"], f["context_line"]) for f in tb["frames"]] == [
        ("run_job", 40, "result = step(job)"), ("step", 12, 'return job["payload"]')]
    assert tb["context"]["log_line"].endswith("job 17 failed")
    ExceptionEvent.model_validate(tb)
    tail.parsers[str(log)].error_at -= 10  # the pending ERROR line has waited long enough for a traceback
    tail.poll_once()
    assert sink.events[-1]["type"] == "LogError" and "disk 91% full" in sink.events[-1]["message"]

    # rotation: the old file's last line is read, then the new file from its start
    with log.open("a") as f:
        f.write("2024-05-01 10:00:03 worker CRITICAL before rotation\n")
    log.rename(tmp_path / "worker.log.1")
    log.write_text("2024-05-01 10:00:04 worker ERROR after rotation\n")
    tail.poll_once()
    tail.parsers[str(log)].error_at -= 10
    tail.poll_once()
    msgs = [e["message"] for e in sink.events]
    assert any("before rotation" in m for m in msgs) and any("after rotation" in m for m in msgs)

    # truncation: read again from the start
    n = len(sink.events)
    log.write_text("ERROR short\n")
    tail.poll_once()
    tail.parsers[str(log)].error_at -= 10
    tail.poll_once()
    assert len(sink.events) == n + 1 and sink.events[-1]["message"] == "ERROR short"
    tail.close()

    # a restarted agent resumes where it stopped
    again = Collect()
    tail2 = LogTail("host-3", [str(log)], again, tmp_path / "state")  # type: ignore[arg-type]
    with log.open("a") as f:
        f.write("ERROR while the agent was down\n")
    tail2.poll_once()
    tail2.parsers[str(log)].error_at -= 10
    tail2.poll_once()
    assert [e["message"] for e in again.events] == ["ERROR while the agent was down"]
    tail2.close()


# --- end to end ----------------------------------------------------------------------------------

def exc_get(c: Cluster, path: str, **params: Any) -> Any:
    r = httpx.get(f"{c.ops_url()}/api/v1/exceptions{path}", params=params, headers=c.auth("viewer"), timeout=10)
    r.raise_for_status()
    return r.json()


def raise_in_trainer(c: Cluster, label: str) -> None:
    r = httpx.post(f"{c.trainer_url('trainer-1')}/_debug/raise", params={"label": label}, timeout=10)
    assert r.status_code == 500


def test_exceptions_while_the_dispatcher_is_down_all_arrive_once(make_cluster: Callable[..., Cluster],
                                                                 tmp_path: Path) -> None:
    c = make_cluster(trainers=1)
    c.env |= {"CTOPS_TRAINER_DEBUG": "1", "CTOPS_CAPTURE_SPOOL": str(tmp_path / "spool")}
    c.start("trainer-1")
    c.start("A")
    wait_for("trainer", lambda: httpx.get(f"{c.trainer_url('trainer-1')}/healthz", timeout=2).status_code == 200)
    wait_for("dispatcher", lambda: exc_get(c, "/stats") is not None)
    for i in range(5):
        raise_in_trainer(c, f"before-{i}")
    wait_for("the first 5 events", lambda: exc_get(c, "/stats")["events"] == 5)

    c.signal("A", signal.SIGKILL)
    c.children["A"].proc.wait()
    for i in range(12):
        raise_in_trainer(c, f"during-{i}")
    spool = tmp_path / "spool" / "trainer-host-1"
    wait_for("events spooled on disk", lambda: sum(p.stat().st_size for p in spool.glob("*.seg")) > 0)

    c.start("A")
    for i in range(3):
        raise_in_trainer(c, f"after-{i}")
    wait_for("all 20 events", lambda: exc_get(c, "/stats")["events"] >= 20, timeout=60)
    items = exc_get(c, "/tail", limit=1000)["items"]
    labels = [o["event"]["message"].rsplit(": ", 1)[1] for o in items]
    assert len(items) == 20 and len({o["event"]["event_id"] for o in items}) == 20
    assert sorted(labels) == sorted([f"before-{i}" for i in range(5)] + [f"during-{i}" for i in range(12)]
                                    + [f"after-{i}" for i in range(3)])
    # the spooled ones replayed in the order they happened
    during = [x for x in labels if x.startswith("during-")]
    assert during == [f"during-{i}" for i in range(12)]
    [g] = exc_get(c, "/groups")["groups"]
    assert g["count"] == 20 and g["type"] == "trainer.debug.DebugFailure" and g["culprit"] == "trainer.debug.explode"
    assert os.path.isdir(spool)

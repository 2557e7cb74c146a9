"""The on-disk spool and the forwarder that drains it: order, damage, bounds, poison batches. No network."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import httpx
import pytest

from ctops.capture.forwarder import Forwarder
from ctops.capture.spool import Spool, open_spool


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"event_id": f"ev{i:08d}", "n": i}).encode() for i in range(start, start + n)]


def drain(sp: Spool, batch: int = 7) -> list[int]:
    out: list[int] = []
    while sp.pending():
        records, pos = sp.read(batch, 1 << 20)
        out += [json.loads(r)["n"] for r in records]
        sp.commit(pos)
    return out


def test_records_replay_in_order_across_segments_and_restarts(tmp_path: Path) -> None:
    sp = Spool(tmp_path, segment_bytes=200, fsync=False)
    sp.append(payloads(10))
    sp.append(payloads(10, 10))
    assert len(list(tmp_path.glob("*.seg"))) > 1
    records, pos = sp.read(5, 1 << 20)
    sp.commit(pos)
    sp.close()
    sp = Spool(tmp_path, segment_bytes=200, fsync=False)  # a restarted service resumes at the cursor
    sp.append(payloads(5, 20))
    assert drain(sp) == list(range(5, 25))
    assert not sp.pending() and not list(tmp_path.glob("*.seg"))[1:]
    assert sp.corrupt == 0 and sp.dropped == 0


def test_torn_last_record_and_corrupt_middle_one_are_skipped_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sp = Spool(tmp_path, fsync=False)
    sp.append(payloads(5))
    sp.close()
    seg = next(tmp_path.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    lines = bytes(data).split(b"\n")
    middle = sum(len(x) + 1 for x in lines[:2]) + 20  # inside record 2's JSON
    data[middle] ^= 0x01
    data += b"0badc0de 40 {\"event_id\": \"torn\""  # a write cut short: no end of line
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="ctops.capture.spool"):
        sp = Spool(tmp_path, fsync=False)
        sp.append(payloads(2, 5))  # written after the damage, in a new segment
        assert drain(sp) == [0, 1, 3, 4, 5, 6]
    assert sp.corrupt == 2
    reasons = [r.getMessage() for r in caplog.records]
    assert any("checksum or length mismatch" in m for m in reasons) and any("torn record" in m for m in reasons)
    sp.close()
    assert Spool(tmp_path, fsync=False).corrupt == 2  # the count survives a restart (it is reported upstream)


def test_over_the_cap_the_oldest_segment_is_dropped_and_counted(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=4000, segment_bytes=1000, fsync=False)
    for i in range(20):
        sp.append(payloads(5, i * 5))
    assert sp.size() <= 4000 + 1000
    left = drain(sp)
    assert sp.dropped > 0 and sp.dropped + len(left) == 100
    assert left == list(range(100 - len(left), 100))  # the newest are kept, in order


def test_a_second_process_gets_its_own_spool(tmp_path: Path) -> None:
    first = open_spool(tmp_path / "s", fsync=False)
    second = open_spool(tmp_path / "s", fsync=False)
    assert first.dir != second.dir
    first.close()
    second.close()


class FakeDispatcher:
    """An httpx transport that is up or down, keeps what it took, and refuses events marked bad."""

    def __init__(self) -> None:
        self.up = False
        self.received: list[str] = []
        self.counters: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content)
        if any(e.get("bad") for e in body["events"]):
            return httpx.Response(422, json={"error": "invalid request"})
        with self.lock:
            self.received += [e["event_id"] for e in body["events"]]
            self.counters.append(body["counters"])
        return httpx.Response(200, json={"accepted": len(body["events"]), "duplicates": 0})


def test_forwarder_spools_while_down_and_replays_in_order(tmp_path: Path) -> None:
    fake = FakeDispatcher()
    fw = Forwarder(["http://d"], "tok", Spool(tmp_path, fsync=False), sender="t", transport=httpx.MockTransport(fake),
                   retry_max=0.2)
    fw.start()
    try:
        for p in payloads(30):
            assert fw.submit(p)
        assert not fw.flush(1.0)  # nobody answers: not drained
        assert fw.spooled == 30 and fw.spool is not None and fw.spool.pending()
        fake.up = True
        for p in payloads(10, 30):
            fw.submit(p)
        assert fw.flush(30.0)
        assert fake.received == [f"ev{i:08d}" for i in range(40)]
    finally:
        fw.close()


def test_a_refused_event_is_isolated_dropped_and_counted(tmp_path: Path) -> None:
    fake = FakeDispatcher()
    fake.up = True
    fw = Forwarder(["http://d"], "tok", Spool(tmp_path, fsync=False), sender="t", transport=httpx.MockTransport(fake))
    fw.start()
    try:
        batch = payloads(9)
        batch.insert(4, json.dumps({"event_id": "poison", "bad": True}).encode())
        for p in batch:
            fw.submit(p)
        assert fw.flush(30.0)
        assert sorted(fake.received) == [f"ev{i:08d}" for i in range(9)]
        assert fw.counters()["rejected"] == 1
    finally:
        fw.close()


def test_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    fw = Forwarder([], None, None, sender="t", queue_max=3)  # never started: nothing drains
    assert [fw.submit(p) for p in payloads(5)] == [True, True, True, False, False]
    assert fw.counters()["dropped"] == 2

"""Integrity envelopes: every kind of damage a stored record can suffer is told apart from a good
record, and records written before envelopes existed still read."""

from __future__ import annotations

import json

import pytest

from ctops.envelope import ENV_FIELD, Corrupt, seal, seal_fields, unseal, unseal_fields

KEY = "ctops:submission:sub_1"
PAYLOAD = json.dumps({"step": "tested", "passed": 4, "code": "def f(): pass\n" * 40}).encode()


def test_round_trip_keeps_payload_kind_and_generation() -> None:
    rec = unseal(KEY, seal(KEY, "submission", PAYLOAD, generation=7), "submission")
    assert rec is not None
    assert (rec.payload, rec.kind, rec.generation, rec.legacy) == (PAYLOAD, "submission", 7, False)


def test_every_single_byte_change_is_caught() -> None:
    sealed = seal(KEY, "submission", PAYLOAD, generation=3)
    for i in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[i] ^= 0x01
        with pytest.raises(Corrupt):
            unseal(KEY, bytes(damaged), "submission")


def test_truncation_at_any_point_is_caught() -> None:
    sealed = seal(KEY, "submission", PAYLOAD)
    for cut in range(1, len(sealed)):
        with pytest.raises(Corrupt):
            unseal(KEY, sealed[:cut], "submission")


def test_a_record_moved_under_another_key_or_kind_is_refused() -> None:
    sealed = seal(KEY, "submission", PAYLOAD)
    with pytest.raises(Corrupt) as moved:
        unseal("ctops:submission:sub_2", sealed, "submission")
    assert moved.value.reason == "checksum"
    with pytest.raises(Corrupt) as kind:
        unseal(KEY, sealed, "session")
    assert kind.value.reason == "kind"


def test_records_from_before_envelopes_read_as_legacy() -> None:
    rec = unseal(KEY, PAYLOAD.decode(), "submission")
    assert rec is not None and rec.legacy and rec.payload == PAYLOAD
    assert unseal(KEY, None) is None


def test_hash_fields_round_trip_and_damage() -> None:
    fields = {"learner": "ada", "created_ms": "1700000000000", "last_server": "trainer-1"}
    sealed = seal_fields("ctops:session:s1", "session", fields, generation=2)
    got = unseal_fields("ctops:session:s1", sealed, "session")
    assert got == (fields, 2, False)
    for name in fields:
        damaged = dict(sealed)
        damaged[name] = damaged[name] + "x"
        with pytest.raises(Corrupt):
            unseal_fields("ctops:session:s1", damaged, "session")
    # a field added behind the envelope's back is damage too
    with pytest.raises(Corrupt):
        unseal_fields("ctops:session:s1", {**sealed, "admin": "disabled"}, "session")
    # bytes that are not UTF-8, as Redis hands them back
    raw = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in sealed.items()}
    raw[b"learner"] = b"\xff\xfe"
    with pytest.raises(Corrupt) as enc:
        unseal_fields("ctops:session:s1", raw, "session")
    assert enc.value.reason == "encoding"


def test_hash_without_envelope_is_legacy_and_field_order_does_not_matter() -> None:
    assert unseal_fields("k", {"a": "1"}) == ({"a": "1"}, 0, True)
    a = seal_fields("k", "session", {"a": "1", "b": "2"})
    b = seal_fields("k", "session", {"b": "2", "a": "1"})
    assert a[ENV_FIELD] == b[ENV_FIELD]
    # field boundaries are part of the checksum
    assert seal_fields("k", "s", {"ab": "c"})[ENV_FIELD] != seal_fields("k", "s", {"a": "bc"})[ENV_FIELD]

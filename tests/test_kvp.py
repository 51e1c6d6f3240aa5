"""Hyper-V KVP records: byte layout, the PROVISIONING_REPORT encoding, the pool file."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import pytest

from guest_agent.azure import kvp


def test_record_layout() -> None:
    rec = kvp.encode_record("PROVISIONING_REPORT", "result=success")
    assert len(rec) == kvp.RECORD_BYTES == 2560
    assert rec[:19] == b"PROVISIONING_REPORT"
    assert rec[19:512] == b"\0" * (512 - 19)  # key field: 512 bytes, NUL padded
    assert rec[512 : 512 + 14] == b"result=success"
    assert rec[512 + 14 :] == b"\0" * (2048 - 14)  # value field: 2048 bytes, NUL padded


def test_record_truncates_at_utf8_boundaries_to_host_limits() -> None:
    rec = kvp.encode_record("ключ" * 100, "€" * 1000)  # 2-byte and 3-byte characters
    key = rec[:512].rstrip(b"\0")
    value = rec[512:].rstrip(b"\0")
    assert len(key) == 254 and key.decode("utf-8") == "ключ" * 31 + "клю"
    assert len(value) == 1020 and value.decode("utf-8") == "€" * 340  # 1022 would cut a character
    assert kvp.encode_record("k", "a\0b")[512:515] == b"ab\0"  # a NUL would end the value early


def test_empty_key_is_refused() -> None:
    with pytest.raises(ValueError):
        kvp.encode_record("\0", "x")


def test_decode_records_round_trip_ignores_a_torn_tail() -> None:
    data = kvp.encode_record("a", "1") + kvp.encode_record("b", "two|é") + b"PARTIAL"
    assert kvp.decode_records(data) == [("a", "1"), ("b", "two|é")]
    assert kvp.decode_records(b"") == []


def test_provisioning_report_success() -> None:
    text = kvp.build_provisioning_report(
        "success",
        agent="guest-agent/1.2.3",
        vm_id="0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",
        timestamp=1767225600.25,
        stages={"detect": 1.4, "fetch": 250.6},
    )
    assert text == (
        "result=success|agent=guest-agent/1.2.3|vm_id=0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
        "|timestamp=2026-01-01T00:00:00.250Z|detect_ms=1|fetch_ms=251"
    )


def test_provisioning_report_error_quotes_delimiters() -> None:
    reason = "bad user-data | key=value isn't allowed\nsecond line"
    text = kvp.build_provisioning_report(
        "error", agent="guest-agent/1", vm_id="v", timestamp=0.0, reason=reason, stages={"fetch": 3}
    )
    row = next(csv.reader(io.StringIO(text), delimiter="|", quotechar="'"))
    assert row[0] == "result=error"
    assert row[1] == "reason=bad user-data | key=value isn't allowed second line"
    assert row[-1] == "fetch_ms=3"
    assert text.split("|")[0] == "result=error"
    assert text.split("|")[1].startswith("'reason=")  # quoted, inner ' doubled
    parsed = kvp.parse_provisioning_report(text)
    assert parsed["reason"] == "bad user-data | key=value isn't allowed second line"
    assert parsed["timestamp"] == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    ("raw", "gen1", "vm_id"),
    [
        ("5E1D1A2B-3C4D-5E6F-7A8B-9C0D1E2F3A4B\n", False, "5e1d1a2b-3c4d-5e6f-7a8b-9c0d1e2f3a4b"),
        ("5E1D1A2B-3C4D-5E6F-7A8B-9C0D1E2F3A4B\n", True, "2b1a1d5e-4d3c-6f5e-7a8b-9c0d1e2f3a4b"),
        ("not-a-uuid", True, kvp.ZERO_UUID),
    ],
)
def test_vm_id_from_dmi(raw: str, gen1: bool, vm_id: str) -> None:
    assert kvp.vm_id_from_dmi(raw, gen1) == vm_id


def pool(d: Path) -> list[tuple[str, str]]:
    return kvp.decode_records((d / ".kvp_pool_1").read_bytes())


def test_append_creates_and_appends(tmp_path: Path) -> None:
    assert kvp.append_report(str(tmp_path), "A", "1")
    assert kvp.append_report(str(tmp_path), "PROVISIONING_REPORT", "result=success")
    data = (tmp_path / ".kvp_pool_1").read_bytes()
    assert len(data) == 2 * 2560
    assert data[2560:2579] == b"PROVISIONING_REPORT"
    assert pool(tmp_path) == [("A", "1"), ("PROVISIONING_REPORT", "result=success")]


def test_stale_pool_from_a_previous_boot_is_truncated(tmp_path: Path) -> None:
    f = tmp_path / ".kvp_pool_1"
    f.write_bytes(kvp.encode_record("OLD", "previous boot") * 3)
    booted = time.time() - 60
    os.utime(f, (booted - 3600, booted - 3600))
    assert kvp.append_report(str(tmp_path), "NEW", "this boot", booted_at=booted)
    assert pool(tmp_path) == [("NEW", "this boot")]
    # Written during this boot: kept.
    assert kvp.append_report(str(tmp_path), "NEWER", "x", booted_at=booted)
    assert [k for k, _ in pool(tmp_path)] == ["NEW", "NEWER"]


def test_default_boot_time_keeps_a_file_written_now(tmp_path: Path) -> None:
    assert kvp.boot_time() < time.time()
    kvp.append_report(str(tmp_path), "A", "1")
    kvp.append_report(str(tmp_path), "B", "2")
    assert len(pool(tmp_path)) == 2


def test_missing_or_unusable_kvp_dir_never_raises(tmp_path: Path) -> None:
    assert kvp.append_report(str(tmp_path / "absent"), "K", "V") is False
    assert not (tmp_path / "absent").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".kvp_pool_1").mkdir()  # not a file
    assert kvp.append_report(str(tmp_path / "d"), "K", "V") is False
    (tmp_path / "ln").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "ln" / ".kvp_pool_1")
    assert kvp.append_report(str(tmp_path / "ln"), "K", "V") is False  # never follows a symlink
    assert not (tmp_path / "target").exists()


def test_full_pool_is_left_alone(tmp_path: Path) -> None:
    f = tmp_path / ".kvp_pool_1"
    f.write_bytes(kvp.encode_record("X", "y") * kvp.MAX_RECORDS)
    assert kvp.append_report(str(tmp_path), "K", "V", booted_at=0.0) is False
    assert f.stat().st_size == kvp.MAX_RECORDS * kvp.RECORD_BYTES


@pytest.mark.parametrize(
    ("fields", "row"),
    [
        (["result=error", "reason=a|b", "x=it's", "k=v=w", "plain"], "result=error|'reason=a|b'|'x=it''s'|k=v=w|plain"),
        (
            ["line=a\nb", "cr=a\rb", "both=\r\n", "'", "|", "", "  spaced  ", 'dq="x"', "é|ü"],
            "'line=a\nb'|'cr=a\rb'|'both=\r\n'|''''|'|'||  spaced  |dq=\"x\"|'é|ü'",
        ),
        ([""], "''"),
        (["a", ""], "a|"),
    ],
)
def test_encode_report_quotes_as_cloud_init(fields: list[str], row: str) -> None:
    """Byte for byte what cloud-init's csv.writer (delimiter '|', quotechar "'") writes, without
    the line terminator; the csv module reads the fields back."""
    assert kvp.encode_report(fields) == row
    assert next(csv.reader(io.StringIO(row), delimiter="|", quotechar="'")) == fields


@pytest.mark.parametrize(
    ("t", "iso"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (0.0005, "1970-01-01T00:00:00.000Z"),
        (0.0000015, "1970-01-01T00:00:00.000Z"),
        (0.9999995, "1970-01-01T00:00:01.000Z"),  # microseconds round first, then milliseconds truncate
        (1767225600.25, "2026-01-01T00:00:00.250Z"),
        (1767225600.9999996, "2026-01-01T00:00:01.000Z"),
        (2.0**31 + 0.5, "2038-01-19T03:14:08.500Z"),
        (253402300799.9994, "9999-12-31T23:59:59.999Z"),
        (-0.5, "1969-12-31T23:59:59.500Z"),
        (-1.0000005, "1969-12-31T23:59:58.999Z"),
        (-323568000.0, "1959-10-01T00:00:00.000Z"),
    ],
)
def test_iso8601_utc(t: float, iso: str) -> None:
    assert kvp.iso8601_utc(t) == iso


@pytest.mark.parametrize("raw", ["5E1D1A2B-3C4D-5E6F-7A8B-9C0D1E2F3A4B", "00000000-0000-0000-0000-000000000001"])
@pytest.mark.parametrize("gen1", [True, False])
def test_vm_id_matches_the_uuid_module(raw: str, gen1: bool) -> None:
    import uuid

    u = uuid.UUID(raw)
    assert kvp.vm_id_from_dmi(raw, gen1) == str(uuid.UUID(bytes=u.bytes_le) if gen1 else u)

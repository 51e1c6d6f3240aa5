"""The e2e harness's pure parts: user-data shape, dump and console parsing (no QEMU here)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import tomllib

import yaml

from tests.e2e import guest, userdata


def test_valid_user_data_is_caa_shaped() -> None:
    raw, exp = userdata.valid("pod-a")
    text = raw.decode()
    assert text.startswith("#cloud-config\n\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: |\n      {\n")
    doc = yaml.safe_load(text)
    assert list(doc) == ["write_files"]
    by_path = {f["path"]: f["content"] for f in doc["write_files"]}
    # YAML `|` keeps exactly one trailing newline: what the guest must write.
    for name in ("apf.json", "auth.json", "initdata"):
        assert by_path[f"/run/peerpod/{name}"].encode() == exp.files[name]
    assert json.loads(exp.files["apf.json"])["pod-name"] == "pod-a"
    assert exp.pod == "default/pod-a"


def test_initdata_digest_and_pcr() -> None:
    _, exp = userdata.valid()
    toml = gzip.decompress(base64.b64decode(exp.files["initdata"]))
    assert hashlib.sha256(toml).hexdigest() == exp.initdata_digest == exp.files["initdata.digest"].decode()
    data = tomllib.loads(toml.decode())["data"]
    assert exp.files["aa.toml"] == data["aa.toml"].encode()
    assert exp.pcr8 == hashlib.sha256(b"\0" * 32 + bytes.fromhex(exp.initdata_digest)).hexdigest()


def test_pcr_of_caa_fixture_digest() -> None:
    # docs/protocols.md §3: CAA's sha384 test vector and the PCR 8 value its verifier expects.
    digest = "52af3178dd7ad4bf551e629b84b45bfd1fbe1434b980120267181ae3575ea20ca9013b8eadf31d27eed7ff2552d500ef"
    assert userdata.pcr_after_extend(digest) == "b38927609998047b40609a152e8ccb3716450321203fe11c1e0533c648334ed5"


def test_invalid_user_data_has_runcmd() -> None:
    doc = yaml.safe_load(userdata.invalid())
    assert "runcmd" in doc and "write_files" in doc


def _dump_text(doc: dict[str, object]) -> str:
    blob = gzip.compress(json.dumps(doc).encode())
    b64 = base64.encodebytes(blob).decode()
    return f"noise\nE2E-BEGIN\n{b64}E2E-END sha256={hashlib.sha256(blob).hexdigest()}\n"


def test_parse_dump_roundtrip_and_corruption() -> None:
    text = _dump_text({"a": 1})
    assert guest.parse_dump(text) == {"a": 1}
    assert guest.parse_dump(text.replace("E2E-END", "")) is None
    lines = text.split("\n")
    lines[2] = lines[2][:-4] + ("AAAA" if not lines[2].endswith("AAAA") else "BBBB")
    assert guest.parse_dump("\n".join(lines)) is None


def test_clock_offset_takes_the_smallest_bound() -> None:
    lines = [
        guest.ConsoleLine(10.0, "[    1.000000] kernel line (ignored: printk clock)"),
        guest.ConsoleLine(25.1, "E2E-SYNC 22.800000 start"),
        guest.ConsoleLine(25.2, "E2E-SYNC 23.000000 booted"),
    ]
    assert round(guest.clock_offset(lines) or 0, 6) == 2.2
    assert guest.clock_offset([]) is None


def test_systemd_and_journal_helpers() -> None:
    assert guest.usec({"X": "1500000"}, "X") == 1.5
    assert guest.usec({"X": "0"}, "X") is None
    j = [{"MESSAGE": "eth0: link up", "__MONOTONIC_TIMESTAMP": "1"},
         {"MESSAGE": "ens3: DHCPv4 address 168.0.0.4/7", "__MONOTONIC_TIMESTAMP": "12430000"}]  # fmt: skip
    assert guest.dhcp_lease_mono(j) == 12.43
    out = "  sha256:\n    8 : 0x7C254E01C16FD2A0B07A5F026BC5F8A4CF2FF4079913BB532D69F0B0472A3A87\n"
    assert guest.pcr_value(out) == "7c254e01c16fd2a0b07a5f026bc5f8a4cf2ff4079913bb532d69f0b0472a3a87"
    assert guest.structured_fields([{"GUEST_AGENT_STAGE": "x", "MESSAGE_ID": "y", "OTHER": 1}]) == {
        "GUEST_AGENT_STAGE",
        "MESSAGE_ID",
    }


def test_health_reports_json_and_xml() -> None:
    log = [
        {"t": 1.0, "server": "imds", "method": "GET", "path": "/metadata", "status": 200},
        {"t": 2.0, "server": "wireserver", "method": "POST", "path": "/provisioning/health", "status": 201,
         "body": json.dumps({"state": "NotReady", "details": {"description": "runcmd"}})},
        {"t": 3.0, "server": "wireserver", "method": "POST", "path": "/machine?comp=health", "status": 200,
         "body": "<Health><State>Ready</State></Health>"},
        {"t": 4.0, "server": "wireserver", "method": "POST", "path": "/provisioning/health", "status": 503,
         "body": json.dumps({"state": "Ready"})},
    ]  # fmt: skip
    assert [(t, s) for t, s, _ in guest.health_reports(log)] == [(2.0, "NotReady"), (3.0, "Ready")]


def test_stall_summary_says_where_a_boot_without_dump_stopped() -> None:
    def lines(*texts: str) -> list[guest.ConsoleLine]:
        return [guest.ConsoleLine(float(i), t) for i, t in enumerate(texts)]

    quiet = lines(
        "[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mnetwork-online.target\x1b[0m - Network is Online.",
        "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39me2e-sftp-delivery-early.service\x1b[0m.",
        "[   19.1] e2e-sftp-delivery[199]: e2e-sftp-delivery: first piece written, READY=1 sent: waiting for"
        " guest-agent to look",
        # systemd rewrites its progress line with \r: one console line until the next newline
        "\r\x1b[K[    \x1b[0;31m*\x1b[0;1;31m*\x1b[0m\x1b[0;31m*\x1b[0m ] A start job is running for"
        " Peer-pod guest agent (1min 5s / no limit)"
        "\r\x1b[K[   *** ] A start job is running for Peer-pod guest agent (2min / no limit)",
    )
    s = guest.stall_summary(quiet)
    assert s.startswith("e2e-dump never started (multi-user.target not reached)")
    assert "last start job shown running: Peer-pod guest agent;" in s
    assert "last upload step: first piece written, READY=1 sent: waiting for guest-agent to look;" in s
    assert "console: [FAILED] Failed to start e2e-sftp-delivery-early.service." in s

    dumping = lines("E2E-SYNC 40.000000 start", "E2E-SYNC 52.5 booted")
    assert guest.stall_summary(dumping) == "e2e-dump reached 'booted'"

"""Reading results out of the guest: the console log and the e2e-dump document.

Pure functions over text and dicts (unit-tested in test_guest.py); no QEMU here.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

SYNC_RE = re.compile(r"E2E-SYNC (\d+\.\d+) (\S+)")
DHCP_RE = re.compile(r"DHCPv4 address (\S+)")
# systemd's status output on the console (systemd.show_status=1): colours, and the "start job is
# running" lines it rewrites in place with \r (no newline until the next status line).
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STATUS_RE = re.compile(r"\[(?:FAILED|DEPEND| TIME )\] [^\r\n]*")
JOB_RE = re.compile(r"A (?:start|stop) job is running for (.+?) \(")
DELIVERY_RE = re.compile(r"e2e-sftp-delivery: ([^\r\n]*)")  # the byom upload's progress lines


@dataclass(frozen=True)
class ConsoleLine:
    t: float  # host seconds since QEMU was started, when the line arrived
    text: str


def parse_dump(text: str) -> dict[str, Any] | None:
    """The JSON document between E2E-BEGIN and E2E-END, or None if incomplete or corrupt."""
    m = re.search(r"E2E-BEGIN\n(.*?)E2E-END sha256=([0-9a-f]{64})", text, re.S)
    if not m:
        return None
    blob = base64.b64decode("".join(m.group(1).split()))
    if hashlib.sha256(blob).hexdigest() != m.group(2):
        return None
    doc: dict[str, Any] = json.loads(gzip.decompress(blob))
    return doc


def clock_offset(lines: list[ConsoleLine]) -> float | None:
    """Host time minus guest CLOCK_MONOTONIC, from the E2E-SYNC lines.

    Each line arrives at or after the moment it was written, so every line gives an upper bound
    of the offset; the smallest is the best estimate (the serial port adds latency, never less).
    Kernel `[ 1.234]` stamps are not used: printk's clock is not CLOCK_MONOTONIC (under TCG they
    were measured 0.5 s apart).
    """
    best: float | None = None
    for ln in lines:
        m = SYNC_RE.search(ln.text)
        if m:
            off = ln.t - float(m.group(1))
            best = off if best is None else min(best, off)
    return best


def stall_summary(lines: list[ConsoleLine], keep: int = 5) -> str:
    """Where a boot that gave no dump stopped, from its console: the last E2E-SYNC stage of e2e-dump
    (none: boot never reached multi-user.target, after which e2e-dump starts), the last start job
    systemd showed running, the byom upload's last step, and the last `keep` FAILED/DEPEND/TIME lines."""
    syncs = [m.group(2) for ln in lines if (m := SYNC_RE.search(ln.text))]
    text = "\n".join(ANSI_RE.sub("", ln.text) for ln in lines)
    parts = [f"e2e-dump reached {syncs[-1]!r}" if syncs else "e2e-dump never started (multi-user.target not reached)"]
    jobs = JOB_RE.findall(text)
    if jobs:
        parts.append(f"last start job shown running: {jobs[-1]}")
    steps = DELIVERY_RE.findall(text)
    if steps:
        parts.append(f"last upload step: {steps[-1]}")
    bad = [b.strip() for b in STATUS_RE.findall(text)]
    if bad:
        parts.append("console: " + " | ".join(bad[-keep:]))
    return "; ".join(parts)


def usec(props: dict[str, str], key: str) -> float | None:
    """A systemd *TimestampMonotonic property (µs) in seconds; 0 or absent means never."""
    v = props.get(key, "0")
    return int(v) / 1e6 if v.isdigit() and int(v) > 0 else None


def dhcp_lease_mono(networkd_journal: list[dict[str, Any]]) -> float | None:
    for e in networkd_journal:
        msg = e.get("MESSAGE")
        if isinstance(msg, str) and DHCP_RE.search(msg):
            return int(e["__MONOTONIC_TIMESTAMP"]) / 1e6
    return None


def pcr_value(pcrread_out: str, index: int = 8) -> str | None:
    """The hex value of PCR `index` from `tpm2_pcrread sha256:N` output."""
    m = re.search(rf"^\s*{index}\s*:\s*0x([0-9A-Fa-f]+)", pcrread_out, re.M)
    return m.group(1).lower() if m else None


def stage_end(timeline: dict[str, Any], name: str) -> float | None:
    for st in timeline.get("stages", []) if isinstance(timeline, dict) else []:
        if st.get("name") == name and st.get("end") is not None:
            return float(st["end"])
    return None


def structured_fields(journal: list[dict[str, Any]]) -> set[str]:
    """Which GUEST_AGENT_* / MESSAGE_ID fields the agent's journal entries carry."""
    out: set[str] = set()
    for e in journal:
        out.update(k for k in e if k.startswith("GUEST_AGENT_") or k == "MESSAGE_ID")
    return out


def health_reports(log: list[dict[str, Any]]) -> list[tuple[float, str, str]]:
    """(host time, state, body) of each health report the fake wireserver received (JSON or XML)."""
    out = []
    for e in log:
        if e.get("server") != "wireserver" or e.get("method") != "POST":
            continue
        body = e.get("body") or ""
        path = e.get("path", "")
        state = ""
        if path.startswith("/provisioning/health"):
            try:
                state = str(json.loads(body).get("state", ""))
            except ValueError:
                state = ""
        elif "comp=health" in path:
            m = re.search(r"<State>(\w+)</State>", body)
            state = m.group(1) if m else ""
        else:
            continue
        if e.get("status") is not None and 200 <= int(e["status"]) < 300:
            out.append((float(e["t"]), state, body))
    return out

"""Hyper-V KVP diagnostics: leave a PROVISIONING_REPORT record the Azure host can read.

The guest appends fixed-size records to ``/var/lib/hyperv/.kvp_pool_1``; ``hv_kvp_daemon``
relays them to the host over VMBus (linux tools/hv/hv_kvp_daemon.c).  The host collects KVP when it receives
the health report and ignores records written later, so a report must be on disk (fsync'd)
before the health POST (cloud-init helpers/azure.py `_post_health_report`).

Nothing here may fail provisioning: `append_report` logs and returns False instead of raising.
"""

from __future__ import annotations

import csv
import datetime
import errno
import fcntl
import io
import os
import time
import uuid

from guest_agent.log import logger

log = logger("guest_agent.azure.kvp")

POOL_FILE = ".kvp_pool_1"  # guest -> host
KEY_FIELD_BYTES = 512  # HV_KVP_EXCHANGE_MAX_KEY_SIZE
VALUE_FIELD_BYTES = 2048  # HV_KVP_EXCHANGE_MAX_VALUE_SIZE
RECORD_BYTES = KEY_FIELD_BYTES + VALUE_FIELD_BYTES  # 2560
MAX_RECORDS = 1024  # per pool file
# What the host actually receives: the kernel converts to UTF-16 and silently cuts keys at 254
# and values at 1022 bytes, and a cut through a multi-byte character fails the whole operation
# (azure-init doc/kvp.md).  Cutting here, at a character boundary, keeps every record deliverable.
KEY_MAX_BYTES = 254
VALUE_MAX_BYTES = 1022

PROVISIONING_REPORT_KEY = "PROVISIONING_REPORT"
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


def _truncate_utf8(text: str, limit: int) -> bytes:
    """UTF-8 bytes of `text` without NULs (a NUL ends a field), cut to `limit` at a character boundary."""
    data = text.replace("\0", "").encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def encode_record(key: str, value: str) -> bytes:
    """One 2560-byte record: key (<= 254 bytes used) in a 512-byte field, value (<= 1022) in 2048, NUL-padded."""
    k = _truncate_utf8(key, KEY_MAX_BYTES)
    if not k:
        raise ValueError("a KVP key cannot be empty")
    v = _truncate_utf8(value, VALUE_MAX_BYTES)
    return k.ljust(KEY_FIELD_BYTES, b"\0") + v.ljust(VALUE_FIELD_BYTES, b"\0")


def decode_records(data: bytes) -> list[tuple[str, str]]:
    """Every whole record in a pool file's bytes (a torn trailing record is ignored)."""
    out = []
    for off in range(0, len(data) - RECORD_BYTES + 1, RECORD_BYTES):
        key = data[off : off + KEY_FIELD_BYTES].split(b"\0", 1)[0]
        value = data[off + KEY_FIELD_BYTES : off + RECORD_BYTES].split(b"\0", 1)[0]
        out.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return out


# --------------------------------------------------------------------------- PROVISIONING_REPORT


def encode_report(fields: list[str]) -> str:
    """One '|'-delimited CSV row, quote character "'", quoted only where needed: what
    cloud-init's `encode_report` (cloudinit/sources/azure/errors.py: csv.writer, delimiter '|',
    quotechar "'", QUOTE_MINIMAL) and azure-init write, for PROVISIONING_REPORT and the NotReady
    description, so the host splits ours the same way.  A field holding the delimiter, the
    quote or a line break is quoted with inner quotes doubled."""
    row = io.StringIO()
    csv.writer(row, delimiter="|", quotechar="'", quoting=csv.QUOTE_MINIMAL).writerow(fields)
    return row.getvalue().removesuffix("\r\n")  # the writer's line terminator


def iso8601_utc(timestamp: float) -> str:
    """``2026-01-01T00:00:00.250Z``: UTC, milliseconds (truncated), `Z` for the offset."""
    when = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return when.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


def build_provisioning_report(
    result: str,
    *,
    agent: str,
    vm_id: str,
    timestamp: float,
    reason: str | None = None,
    supporting: dict[str, object] | None = None,
    stages: dict[str, float] | None = None,
) -> str:
    """``result=success|agent=guest-agent/<v>|vm_id=...|timestamp=<ISO8601 UTC>|<stage>_ms=...``.

    With `reason` (result=error): ``result=error|reason=...|agent=...|<supporting k=v>...|vm_id=...
    |timestamp=...``, cloud-init's field order.  Stage durations are whole milliseconds and come
    last, so a cut (KVP values carry 1022 bytes, a health description 512 characters) loses them
    first.  Line breaks inside a value become spaces.
    """
    if result not in ("success", "error"):
        raise ValueError(f"result must be success or error, not {result!r}")

    def f(key: str, value: object, limit: int = 200) -> str:
        return f"{key}={' '.join(str(value).splitlines())[:limit]}"

    fields = [f("result", result)]
    if reason is not None:
        fields.append(f("reason", reason, 512))
    fields.append(f("agent", agent))
    fields += [f(k, v) for k, v in (supporting or {}).items()]
    fields += [f("vm_id", vm_id), f("timestamp", iso8601_utc(timestamp))]
    fields += [f(f"{name}_ms", round(ms)) for name, ms in (stages or {}).items()]
    return encode_report(fields)


def parse_provisioning_report(text: str) -> dict[str, str]:
    """The inverse of `build_provisioning_report` (for tests and tools)."""
    row = next(csv.reader(io.StringIO(text), delimiter="|", quotechar="'"), [])
    return dict(f.split("=", 1) for f in row if "=" in f)


def vm_id_from_dmi(product_uuid: str, gen1: bool) -> str:
    """Azure's vmId from the SMBIOS system UUID, lower-case (equals IMDS compute.vmId).

    Gen1 (BIOS) VMs expose the first three UUID fields little-endian, so they are byte-swapped
    (cloud-init sources/azure/identity.py, azure-init status.rs).  An unparsable
    value gives the all-zero UUID, as azure-init falls back to.
    """
    h = product_uuid.strip().lower().replace("-", "")
    if len(h) != 32 or not all(c in "0123456789abcdef" for c in h):
        return ZERO_UUID
    u = uuid.UUID(hex=h)
    return str(uuid.UUID(bytes=u.bytes_le) if gen1 else u)


# --------------------------------------------------------------------------- pool file


def boot_time(now: float | None = None) -> float:
    """Wall-clock time of boot (time.time() minus CLOCK_BOOTTIME, which counts suspend too)."""
    return (time.time() if now is None else now) - time.clock_gettime(time.CLOCK_BOOTTIME)


def append_report(kvp_dir: str, key: str, value: str, *, booted_at: float | None = None) -> bool:
    """Append one record to ``<kvp_dir>/.kvp_pool_1`` under flock and fsync it.  Never raises.

    Only when `kvp_dir` exists (no Hyper-V KVP otherwise: nothing to do).  A pool file last
    written before this boot is stale and truncated first, as cloud-init and azure-init do.
    flock, like those two; hv_kvp_daemon's fcntl locks are a separate namespace, and it re-reads
    the whole file before every operation, so appending whole records is safe.
    Returns True when the record is on disk.
    """
    if not os.path.isdir(kvp_dir):
        log.info("no KVP directory %s: skipping the %s record (not on Hyper-V?)", kvp_dir, key)
        return False
    path = os.path.join(kvp_dir, POOL_FILE)
    try:
        record = encode_record(key, value)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            since = boot_time() if booted_at is None else booted_at
            if st.st_size and st.st_mtime < since:
                log.info("truncating %s: written before this boot", path)
                os.ftruncate(fd, 0)
            elif st.st_size >= MAX_RECORDS * RECORD_BYTES:
                log.warning("KVP pool %s is full (%d records): skipping the %s record", path, MAX_RECORDS, key)
                return False
            view = memoryview(record)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)  # on disk before the health POST: the host reads KVP when it gets the report
        finally:
            os.close(fd)  # also releases the flock
    except (OSError, ValueError) as exc:
        detail = errno.errorcode.get(exc.errno, str(exc)) if isinstance(exc, OSError) and exc.errno else str(exc)
        log.warning("could not write the %s KVP record to %s: %s", key, path, detail)
        return False
    return True

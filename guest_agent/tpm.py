"""Extend (and read) a TPM 2.0 PCR with raw commands: no tpm2-tools spawn, no TSS library.

CAA measures initdata with `tpm2_pcrextend 8:sha256=<first 64 hex chars of the digest>`
(docs/protocols.md §3). The same TPM2_PCR_Extend command is 65 bytes, built here from
TPM 2.0 Library Part 3 (commands) and Part 2 (structures); all integers are big-endian.

Transport: the kernel's /dev/tpmrm0 (resource manager) takes one whole command per write()
and hands back the whole response on the next read(). swtpm's data socket (and QEMU's chardev)
is a byte stream, so responses are read as a 10-byte header and then the rest; the same loop
serves both, because a TPM char device satisfies it in one read.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from collections.abc import Callable

from guest_agent.errors import EXIT_UNAVAILABLE, AgentError

TPM_ST_NO_SESSIONS = 0x8001
TPM_ST_SESSIONS = 0x8002
TPM_CC_PCR_EXTEND = 0x00000182
TPM_CC_PCR_READ = 0x0000017E
TPM_RS_PW = 0x40000009  # the password "session": empty auth value, no nonce, no HMAC
TPM_ALG_SHA256 = 0x000B
SHA256_LEN = 32
PCR_MAX = 23  # a PC-client TPM implements PCRs 0..23 (TCG PC Client Platform TPM Profile)

HEADER = struct.Struct(">HII")  # tag, size, command code (command) / response code (response)
MAX_RESPONSE = 4096  # TPM2_PT_MAX_RESPONSE_SIZE is 4096 on common TPMs; our responses are < 100 bytes

# Response codes after which the command was not executed and may simply be sent again.
# TSS2 ESYS resubmits on exactly these, up to 5 times (_ESYS_MAX_SUBMISSIONS).
TPM_RC_YIELDED = 0x908
TPM_RC_TESTING = 0x90A
TPM_RC_RETRY = 0x922
RETRYABLE_RCS = frozenset({TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_RETRY})

_RC_NAMES = {
    0x100: "TPM_RC_INITIALIZE (TPM2_Startup not run)",
    0x101: "TPM_RC_FAILURE (TPM in failure mode)",
    0x907: "TPM_RC_LOCALITY",
    TPM_RC_YIELDED: "TPM_RC_YIELDED",
    TPM_RC_TESTING: "TPM_RC_TESTING",
    TPM_RC_RETRY: "TPM_RC_RETRY",
}


class TpmError(AgentError):
    """The TPM refused or could not complete a measurement (the unit retries)."""

    exit_code = EXIT_UNAVAILABLE


def rc_name(rc: int) -> str:
    return _RC_NAMES.get(rc, f"0x{rc:x}")


def _check_pcr(pcr: int) -> None:
    if not 0 <= pcr <= PCR_MAX:
        raise ValueError(f"PCR index {pcr} is outside 0..{PCR_MAX}")


def build_pcr_extend(pcr: int, digest32: bytes) -> bytes:
    """TPM2_PCR_Extend(pcrHandle=pcr, digests={sha256: digest32}) with an empty password session."""
    _check_pcr(pcr)
    if len(digest32) != SHA256_LEN:
        raise ValueError(f"a sha256 extend value is {SHA256_LEN} bytes, got {len(digest32)}")
    # TPMS_AUTH_COMMAND: sessionHandle, nonceCaller (TPM2B, empty), sessionAttributes (1 byte), hmac (TPM2B, empty)
    auth = struct.pack(">IHBH", TPM_RS_PW, 0, 0, 0)
    body = (
        struct.pack(">I", pcr)  # TPMI_DH_PCR: a PCR's handle is its index (handle type 0x00)
        + struct.pack(">I", len(auth))  # authorizationSize
        + auth
        + struct.pack(">IH", 1, TPM_ALG_SHA256)  # TPML_DIGEST_VALUES: count 1, TPMT_HA.hashAlg
        + digest32
    )
    return HEADER.pack(TPM_ST_SESSIONS, HEADER.size + len(body), TPM_CC_PCR_EXTEND) + body


def build_pcr_read(pcr: int) -> bytes:
    """TPM2_PCR_Read of one sha256 PCR (no sessions)."""
    _check_pcr(pcr)
    select = bytearray(3)  # TPMS_PCR_SELECT: 3 bytes cover PCRs 0..23; bit n of byte n//8 selects PCR n
    select[pcr // 8] |= 1 << (pcr % 8)
    body = struct.pack(">IHB", 1, TPM_ALG_SHA256, len(select)) + bytes(select)  # TPML_PCR_SELECTION
    return HEADER.pack(TPM_ST_NO_SESSIONS, HEADER.size + len(body), TPM_CC_PCR_READ) + body


def parse_response(resp: bytes) -> int:
    """Check a response's header against its length and return its response code (0 = success)."""
    if len(resp) < HEADER.size:
        raise TpmError("TPM response is shorter than its header", length=len(resp))
    tag, size, rc = HEADER.unpack_from(resp)
    if tag not in (TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS):
        raise TpmError("TPM response has an unknown tag", tag=f"0x{tag:04x}")
    if size != len(resp):
        raise TpmError("TPM response size field does not match its length", size=size, length=len(resp))
    return int(rc)


def parse_pcr_read(resp: bytes) -> bytes:
    """The 32-byte value from a successful TPM2_PCR_Read response for one sha256 PCR."""
    rc = parse_response(resp)
    if rc != 0:
        raise TpmError("TPM2_PCR_Read failed", rc=f"0x{rc:x}", name=rc_name(rc))
    try:
        off = HEADER.size + 4  # pcrUpdateCounter
        (count,) = struct.unpack_from(">I", resp, off)  # TPML_PCR_SELECTION echoing what was read
        off += 4
        for _ in range(count):
            _alg, size_of_select = struct.unpack_from(">HB", resp, off)
            off += 3 + size_of_select
        (ndigests,) = struct.unpack_from(">I", resp, off)  # TPML_DIGEST
        off += 4
        if ndigests != 1:
            raise TpmError("TPM2_PCR_Read returned no value for the PCR", count=ndigests)
        (dlen,) = struct.unpack_from(">H", resp, off)
        off += 2
    except struct.error as exc:
        raise TpmError("TPM2_PCR_Read response is truncated") from exc
    value = resp[off : off + dlen]
    if dlen != SHA256_LEN or len(value) != dlen:
        raise TpmError("TPM2_PCR_Read returned a value of the wrong size", size=dlen)
    return value


def tpm_present(device: str) -> bool:
    """True if `device` is a TPM: a character device (/dev/tpmrm0), or a unix stream socket
    speaking the raw TPM command stream (swtpm's `--server type=unixio`, for tests)."""
    try:
        mode = os.stat(device).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


# The firmware's announcement of a TPM 2.0: its ACPI table (the vTPMs of Azure, GCP and AWS's NitroTPM,
# QEMU's tpm-tis and tpm-crb).  With it, a missing /dev/tpmrm0 means its driver is not bound yet (a
# kernel whose TPM drivers are modules, loaded by udev), not "no TPM".
ACPI_TPM2_TABLE = "/sys/firmware/acpi/tables/TPM2"


def wait_for_device(device: str, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> bool:
    """Wait up to `timeout_s` for `device` to appear (inotify on its directory: devtmpfs creates the
    node when the driver binds); True if it is there."""
    present = tpm_present(device)
    if present or timeout_s <= 0:
        return present
    import select

    from guest_agent import inotify  # ctypes: only on this rare path

    deadline = clock() + timeout_s
    directory = os.path.dirname(device)
    try:
        watch = inotify.DirWatch(directory, inotify.IN_CREATE | inotify.IN_MOVED_TO)
    except OSError as exc:
        raise TpmError("cannot watch for the TPM device", directory=directory, error=exc.strerror) from exc
    with watch:
        poller = select.poll()
        poller.register(watch.fileno(), select.POLLIN)
        while not tpm_present(device):  # looked at after the watch exists: a node made in between is seen
            remaining = deadline - clock()
            if remaining <= 0:
                return False
            if poller.poll(int(remaining * 1000) + 1):
                watch.read()
    return True


class _Connection:
    """`with connect(device) as dev`: dev is the device path itself, or a connected socket's fd,
    closed on exit.  (A small class, not contextlib: the boot path does not import contextlib.)"""

    __slots__ = ("_sock", "device")

    def __init__(self, device: str) -> None:
        self.device = device
        self._sock: socket.socket | None = None

    def __enter__(self) -> str | int:
        if not stat.S_ISSOCK(os.stat(self.device).st_mode):
            return self.device
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(10)
            try:
                s.connect(self.device)
            except OSError as exc:
                raise TpmError("cannot connect to the TPM socket", device=self.device, error=str(exc)) from exc
            s.setblocking(True)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        except BaseException:
            s.close()
            raise
        self._sock = s
        return s.fileno()

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def connect(device: str) -> _Connection:
    """What `extend_pcr`/`read_pcr` take, as a context manager (see `_Connection`)."""
    return _Connection(device)


def _read_response(fd: int) -> bytes:
    buf = b""
    while True:
        if len(buf) >= HEADER.size:
            _tag, size, _rc = HEADER.unpack_from(buf)
            if size < HEADER.size or size > MAX_RESPONSE:
                raise TpmError("TPM response announces an impossible size", size=size)
            if len(buf) >= size:
                return buf  # parse_response rejects trailing bytes
        chunk = os.read(fd, MAX_RESPONSE)
        if not chunk:
            raise TpmError("TPM closed the connection before a whole response", received=len(buf))
        buf += chunk


def transact(device: str | int, command: bytes) -> bytes:
    """Send one command and return one response.

    `device` is a TPM character device path (opened and closed here), or an already-open,
    blocking file descriptor of a byte-stream transport (e.g. swtpm's data socket; not closed here).
    """
    if isinstance(device, int):
        fd, owned = device, False
    else:
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TpmError("cannot open the TPM device", device=device, error=exc.strerror) from exc
        owned = True
    try:
        view = memoryview(command)
        while view:  # a TPM char device takes the whole command in one write; a socket may not
            n = os.write(fd, view)
            view = view[n:]
        return _read_response(fd)
    except OSError as exc:
        raise TpmError("TPM I/O failed", device=str(device), error=exc.strerror or str(exc)) from exc
    finally:
        if owned:
            os.close(fd)


def _run(device: str | int, command: bytes, what: str, attempts: int) -> bytes:
    rc = 0
    for _ in range(max(1, attempts)):
        resp = transact(device, command)
        rc = parse_response(resp)
        if rc not in RETRYABLE_RCS:
            break
    if rc != 0:
        raise TpmError(f"{what} failed with TPM response code 0x{rc:x}", rc=f"0x{rc:x}", name=rc_name(rc))
    return resp


def extend_pcr(device: str | int, pcr: int, digest32: bytes, *, attempts: int = 5) -> None:
    """Extend the sha256 bank of `pcr` with `digest32`; raise TpmError unless the TPM says success.

    Retries only the response codes meaning "not executed, send again" (see RETRYABLE_RCS).
    """
    _run(device, build_pcr_extend(pcr, digest32), "TPM2_PCR_Extend", attempts)


def read_pcr(device: str | int, pcr: int, *, attempts: int = 5) -> bytes:
    """The current sha256 value of `pcr` (for logging the measurement and for tests)."""
    return parse_pcr_read(_run(device, build_pcr_read(pcr), "TPM2_PCR_Read", attempts))

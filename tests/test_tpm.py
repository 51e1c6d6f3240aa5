"""TPM2_PCR_Extend bytes, response parsing, and the real thing against swtpm.

swtpm runs in socket mode on unix sockets in a temporary directory. The test drives swtpm's
data socket with the exact command bytes the agent writes to /dev/tpmrm0, then reads PCR 8
back with tpm2-tools (`-T swtpm:path=...`, which expects the control socket at `<path>.ctrl`)
as an independent check.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_agent import tpm
from guest_agent.initdata import DEFAULT_INITDATA_TOML, expected_pcr
from tests.swtpm import Swtpm, needs_swtpm

CAA_SHA384 = bytes.fromhex(
    "52af3178dd7ad4bf551e629b84b45bfd1fbe1434b980120267181ae3575ea20ca9013b8eadf31d27eed7ff2552d500ef"
)
CAA_PCR8 = "b38927609998047b40609a152e8ccb3716450321203fe11c1e0533c648334ed5"
ZERO32 = bytes(32)

# ---------------------------------------------------------------- pure


def test_build_pcr_extend_matches_spec_layout() -> None:
    cmd = tpm.build_pcr_extend(8, CAA_SHA384[:32])
    # tag ST_SESSIONS, size 65, CC_PCR_Extend, pcrHandle 8, authorizationSize 9,
    # TPM_RS_PW + empty nonce + attributes 0 + empty hmac, TPML_DIGEST_VALUES count 1, TPM_ALG_SHA256
    header = "8002 00000041 00000182 00000008 00000009 40000009 0000 00 0000 00000001 000b"
    expected = bytes.fromhex(header) + CAA_SHA384[:32]
    assert len(cmd) == 65
    assert cmd == expected


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        tpm.build_pcr_extend(8, CAA_SHA384)  # 48 bytes: the caller must truncate
    with pytest.raises(ValueError):
        tpm.build_pcr_extend(24, ZERO32)
    with pytest.raises(ValueError):
        tpm.build_pcr_extend(-1, ZERO32)


def test_build_pcr_read() -> None:
    assert tpm.build_pcr_read(8).hex() == bytes.fromhex("8001 00000014 0000017e 00000001 000b 03 000100").hex()
    assert tpm.build_pcr_read(23).hex().endswith("000b03000080")


def test_parse_response() -> None:
    ok = bytes.fromhex("8002 00000013 00000000 00000000 0000 00 0000")  # params size 0 + auth response
    assert tpm.parse_response(ok) == 0
    assert tpm.parse_response(bytes.fromhex("80010000000a00000100")) == 0x100
    for bad in (b"", bytes.fromhex("8001000000"), bytes.fromhex("c4010000000a00000000"), ok[:-1], ok + b"\0"):
        with pytest.raises(tpm.TpmError):
            tpm.parse_response(bad)


def test_tpm_present(tmp_path: Path) -> None:
    assert not tpm.tpm_present(str(tmp_path / "tpmrm0"))
    (tmp_path / "file").write_bytes(b"")
    assert not tpm.tpm_present(str(tmp_path / "file"))


def test_connect_gives_the_device_path_or_a_socket_fd_closed_after(tmp_path: Path) -> None:
    with tpm.connect("/dev/null") as dev:  # a character device: the path itself, opened per command
        assert dev == "/dev/null"
    path = str(tmp_path / "tpm.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with tpm.connect(path) as fd:
            assert isinstance(fd, int)
            peer, _ = server.accept()
        with peer:
            assert peer.recv(1) == b""  # the agent's end is closed when the block ends
    refused = str(tmp_path / "refused.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(refused)  # a socket file nobody listens on
        with pytest.raises(tpm.TpmError, match="cannot connect"), tpm.connect(refused):
            pass


def test_missing_device_is_tpm_error(tmp_path: Path) -> None:
    with pytest.raises(tpm.TpmError) as info:
        tpm.extend_pcr(str(tmp_path / "tpmrm0"), 8, ZERO32)
    assert info.value.exit_code == 69
    assert info.value.supporting_data["device"].endswith("tpmrm0")


# ---------------------------------------------------------------- stream transport with a scripted peer


def _scripted_peer(sock: socket.socket, responses: list[bytes | None], received: list[bytes]) -> None:
    """Answer each command with the next response, sent in 1-byte pieces to exercise reassembly.

    None: take the command and hang up without answering.
    """
    with sock:
        for resp in responses:
            received.append(sock.recv(4096))
            if resp is None:
                return
            for i in range(len(resp)):
                sock.sendall(resp[i : i + 1])


def _with_peer(responses: list[bytes | None], fn: Callable[[int], None]) -> list[bytes]:
    ours, theirs = socket.socketpair()
    received: list[bytes] = []
    t = threading.Thread(target=_scripted_peer, args=(theirs, responses, received))
    t.start()
    try:
        with ours:
            fn(ours.fileno())
    finally:
        t.join()
    return received


def test_stream_reads_header_then_rest_and_retries() -> None:
    ok = bytes.fromhex("8002 00000013 00000000 00000000 0000 00 0000")
    retry = bytes.fromhex("80010000000a00000922")
    received = _with_peer([retry, ok], lambda fd: tpm.extend_pcr(fd, 8, ZERO32))
    assert received == [tpm.build_pcr_extend(8, ZERO32)] * 2


def test_stream_error_rc_and_eof() -> None:
    def extend(fd: int) -> None:
        with pytest.raises(tpm.TpmError) as info:
            tpm.extend_pcr(fd, 8, ZERO32)
        assert info.value.supporting_data["rc"] == "0x9a2"
        assert "0x9a2" in info.value.reason
        with pytest.raises(tpm.TpmError) as info:  # peer closed: no response
            tpm.extend_pcr(fd, 8, ZERO32)
        assert "closed" in info.value.reason

    _with_peer([bytes.fromhex("80010000000a000009a2"), None], extend)


# ---------------------------------------------------------------- swtpm


@needs_swtpm
def test_swtpm_extend_matches_caa_vector(swtpm: Swtpm) -> None:
    assert swtpm.pcrread(8) == ZERO32
    with swtpm.connect() as s:
        tpm.extend_pcr(s.fileno(), 8, CAA_SHA384[:32])
        assert tpm.read_pcr(s.fileno(), 8).hex() == CAA_PCR8
    # the session is closed before tpm2-tools connects: swtpm serves one data connection at a time
    value = swtpm.pcrread(8)
    assert value.hex() == CAA_PCR8
    assert value == expected_pcr(ZERO32, CAA_SHA384[:32])


@needs_swtpm
def test_swtpm_extends_chain_and_touch_only_one_pcr(swtpm: Swtpm) -> None:
    default = hashlib.sha256(DEFAULT_INITDATA_TOML).digest()
    other = hashlib.sha256(b"second").digest()
    with swtpm.connect() as s:
        tpm.extend_pcr(s.fileno(), 8, default)
        tpm.extend_pcr(s.fileno(), 8, other)
        assert tpm.read_pcr(s.fileno(), 9) == ZERO32
        assert tpm.read_pcr(s.fileno(), 23) == ZERO32
    assert swtpm.pcrread(8) == expected_pcr(expected_pcr(ZERO32, default), other)
    assert swtpm.pcrread(9) == ZERO32


@needs_swtpm
def test_swtpm_not_started_reports_rc() -> None:
    t = Swtpm(startup=False)  # no TPM2_Startup: every command answers TPM_RC_INITIALIZE
    try:
        with t.connect() as s, pytest.raises(tpm.TpmError) as info:
            tpm.extend_pcr(s.fileno(), 8, ZERO32)
    finally:
        t.stop()
    assert info.value.supporting_data["rc"] == "0x100"
    assert "TPM_RC_INITIALIZE" in info.value.supporting_data["name"]
    assert info.value.exit_code == 69


# ---------------------------------------------------------------------------------------------
# The device's driver still loading: the firmware announces a TPM, /dev/tpmrm0 comes later


def test_wait_for_device_sees_a_node_made_during_the_wait(tmp_path: Path) -> None:
    device = tmp_path / "tpmrm0"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    timer = threading.Timer(0.2, lambda: sock.bind(str(device)))
    timer.start()
    try:
        assert tpm.wait_for_device(str(device), 30.0)
    finally:
        timer.join()
        sock.close()


def test_wait_for_device_gives_up_at_the_timeout(tmp_path: Path) -> None:
    ticks = iter([0.0, 5.0])  # the deadline is computed at 0 and has passed at the first look
    assert not tpm.wait_for_device(str(tmp_path / "tpmrm0"), 1.0, clock=lambda: next(ticks))
    assert not tpm.wait_for_device(str(tmp_path / "tpmrm0"), 0.0)


def _root(tmp_path: Path, *, announced: bool) -> Path:
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    if announced:
        table = root / tpm.ACPI_TPM2_TABLE.lstrip("/")
        table.parent.mkdir(parents=True)
        table.write_bytes(b"TPM2")
    return root


def test_measure_without_a_tpm_skips_with_a_log_line(tmp_path: Path) -> None:
    from guest_agent import boot
    from guest_agent.config import Config, TpmConfig
    from guest_agent.initdata import parse

    cfg = Config(tpm=TpmConfig(device_wait_s=5.0))
    idata = parse(DEFAULT_INITDATA_TOML)
    assert boot.measure(idata, cfg, str(_root(tmp_path, announced=False)), already=False) == "absent"


def test_measure_fails_when_the_announced_tpm_never_appears(tmp_path: Path) -> None:
    from guest_agent import boot
    from guest_agent.config import Config, TpmConfig
    from guest_agent.errors import EXIT_UNAVAILABLE
    from guest_agent.initdata import parse

    cfg = Config(tpm=TpmConfig(device_wait_s=0.1))
    with pytest.raises(tpm.TpmError) as exc:
        boot.measure(parse(DEFAULT_INITDATA_TOML), cfg, str(_root(tmp_path, announced=True)), already=False)
    assert exc.value.exit_code == EXIT_UNAVAILABLE
    assert "did not appear" in exc.value.reason


def test_wait_for_device_in_a_directory_it_cannot_watch_is_a_tpm_error(tmp_path: Path) -> None:
    with pytest.raises(tpm.TpmError, match="cannot watch") as exc:
        tpm.wait_for_device(str(tmp_path / "no-such-dir" / "tpmrm0"), 1.0)
    assert exc.value.exit_code == 69

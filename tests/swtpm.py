"""A real software TPM (swtpm) on a unix socket, for the tests that measure initdata."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from guest_agent import tpm

needs_swtpm = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")


class Swtpm:
    def __init__(self, startup: bool = True) -> None:
        # unix socket paths must fit in sun_path (108 bytes): keep the directory short
        self.dir = Path(tempfile.mkdtemp(prefix="swtpm-"))
        self.sock = self.dir / "tpm.sock"
        flags = "not-need-init,startup-clear" if startup else "not-need-init"
        # Both sockets listen before swtpm starts (it takes them as fd=): a client connects at
        # once and its request waits in the backlog until swtpm is ready, however slow its start.
        listening = []
        for path in (self.sock, Path(f"{self.sock}.ctrl")):  # .ctrl: where tpm2-tss's swtpm TCTI looks
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(path))
            s.listen(16)
            listening.append(s)
        try:
            self.proc = subprocess.Popen(
                [
                    "swtpm", "socket", "--tpm2",
                    "--server", f"type=unixio,fd={listening[0].fileno()}",
                    "--ctrl", f"type=unixio,fd={listening[1].fileno()}",
                    "--tpmstate", f"dir={self.dir}",
                    "--flags", flags,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=[s.fileno() for s in listening],
            )  # fmt: skip
        finally:
            for s in listening:
                s.close()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.sock))
        except OSError:
            s.close()
            err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else b""
            raise RuntimeError(f"swtpm is not listening: {err!r}") from None
        # blocking socket (os.read on it) but never hang the suite: SO_RCVTIMEO 60 s
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 60, 0))
        return s

    def pcrread(self, pcr: int) -> bytes:
        """PCR value via tpm2-tools (independent of our code), or our own TPM2_PCR_Read without it."""
        if shutil.which("tpm2_pcrread") is None:
            with self.connect() as s:
                return tpm.read_pcr(s.fileno(), pcr)
        out = self.dir / "pcr.bin"
        subprocess.run(
            ["tpm2_pcrread", "-T", f"swtpm:path={self.sock}", f"sha256:{pcr}", "-o", str(out)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return out.read_bytes()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

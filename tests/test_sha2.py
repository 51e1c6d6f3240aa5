"""guest_agent.sha2: the digests hashlib gives, without loading OpenSSL."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from guest_agent import sha2


@pytest.mark.parametrize("name", ["sha256", "sha384", "sha512", "sha1"])
@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 1000])
def test_same_digest_as_hashlib(name: str, data: bytes) -> None:
    h = sha2.new(name, data)
    assert h.digest() == hashlib.new(name, data).digest()
    assert h.hexdigest() == hashlib.new(name, data).hexdigest()
    assert sha2.sha256(data).digest() == hashlib.sha256(data).digest()


def test_sha2_names_do_not_import_hashlib() -> None:
    code = "import sys; from guest_agent import sha2; sha2.new('sha384', b'x'); print('hashlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

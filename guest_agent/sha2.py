"""SHA-256/384/512 from the interpreter's own implementations, without loading OpenSSL.

`hashlib` loads OpenSSL's libcrypto (`_hashlib`) at import: ~4 ms of CPU on every boot
(`python -X importtime -c 'import hashlib'`) for a few small digests.  Debian's python3 has the
SHA-2 modules built in (`_sha256`/`_sha512` in 3.11, `_sha2` from 3.12), whose import costs
nothing; the digests are the same.  When neither is there, `hashlib` is used.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Protocol


class Hash(Protocol):
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


# Per algorithm, the modules that may hold its constructor, by Python version.
_BUILTIN = {"sha256": ("_sha256", "_sha2"), "sha384": ("_sha512", "_sha2"), "sha512": ("_sha512", "_sha2")}
_found: dict[str, Callable[[bytes], Hash]] = {}


def new(name: str, data: bytes = b"") -> Hash:
    """hashlib.new(name, data), for the SHA-2 names from the built-in modules."""
    ctor = _found.get(name)
    if ctor is None:
        for module in _BUILTIN.get(name, ()):
            try:
                ctor = getattr(import_module(module), name)
                break
            except (ImportError, AttributeError):
                continue
        else:
            import hashlib

            ctor = lambda data: hashlib.new(name, data)  # noqa: E731
        _found[name] = ctor
    return ctor(data)


def sha256(data: bytes = b"") -> Hash:
    return new("sha256", data)

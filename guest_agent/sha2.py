"""SHA-256/384/512 from the interpreter's own implementations, without loading OpenSSL.

`hashlib` loads OpenSSL's libcrypto (`_hashlib`) at import: ~4 ms of CPU on every boot
(`python -X importtime -c 'import hashlib'`) for a few small digests.  Debian's python3 has the
SHA-2 modules built in (`_sha256`/`_sha512` in 3.11, `_sha2` from 3.12), whose import costs
nothing; the digests are the same.  When neither is there, `hashlib` is used.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    class Hash(Protocol):
        def digest(self) -> bytes: ...
        def hexdigest(self) -> str: ...


# Per algorithm, the modules that may hold its constructor, by Python version.
_BUILTIN = {"sha256": ("_sha256", "_sha2"), "sha384": ("_sha512", "_sha2"), "sha512": ("_sha512", "_sha2")}


def _builtin(name: str) -> Callable[[bytes], Hash] | None:
    for module in _BUILTIN[name]:
        try:
            __import__(module)  # importlib's import_module, without importing importlib
            ctor: Callable[[bytes], Hash] = getattr(sys.modules[module], name)
            return ctor
        except (ImportError, AttributeError):
            continue
    return None


# Looked up at import, which the agent does before waiting for the network: a shared-library
# build of these modules (some interpreters ship them so) then loads before the route, not after.
_FOUND = {name: ctor for name in _BUILTIN if (ctor := _builtin(name)) is not None}


def new(name: str, data: bytes = b"") -> Hash:
    """hashlib.new(name, data), for the SHA-2 names from the built-in modules."""
    ctor = _FOUND.get(name)
    if ctor is not None:
        return ctor(data)
    import hashlib

    return hashlib.new(name, data)


def sha256(data: bytes = b"") -> Hash:
    return new("sha256", data)

"""Bounded decoding of untrusted bytes: base64 and gzip layers, detected by content.

Everything here is pure and raises `UserDataInvalid` with a reason; nothing is retried,
because bad input does not get better.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib

from guest_agent.errors import UserDataInvalid

GZIP_MAGIC = b"\x1f\x8b"
_B64_CHARS = re.compile(rb"[A-Za-z0-9+/=\s]+")
_WS = re.compile(rb"\s+")


def b64decode_strict(data: bytes, *, what: str) -> bytes:
    """Standard-alphabet base64 with any whitespace removed first, then validated.

    Python's `b64decode` silently drops invalid characters unless `validate=True`;
    cloud-init strips all whitespace (IMDS and OVF bodies carry line breaks).
    """
    try:
        return base64.b64decode(_WS.sub(b"", data), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserDataInvalid(f"{what} is not valid base64", error=str(exc)) from exc


def looks_like_base64(data: bytes) -> bool:
    stripped = _WS.sub(b"", data)
    return len(stripped) >= 4 and len(stripped) % 4 == 0 and _B64_CHARS.fullmatch(data) is not None


def gunzip_bounded(data: bytes, *, limit: int, what: str) -> bytes:
    """Decompress one gzip stream, refusing to produce more than `limit` bytes (gzip bombs)."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise UserDataInvalid(f"{what} decompresses to more than the size limit", limit_bytes=limit)
        out += d.flush()
    except zlib.error as exc:
        raise UserDataInvalid(f"{what} is not valid gzip", error=str(exc)) from exc
    if len(out) > limit:
        raise UserDataInvalid(f"{what} decompresses to more than the size limit", limit_bytes=limit)
    if not d.eof:
        raise UserDataInvalid(f"{what} is a truncated gzip stream")
    return out


def unwrap_layers(data: bytes, *, limit: int, what: str, max_layers: int = 4) -> bytes:
    """Peel optional gzip and base64 layers (in any order) until plain content remains.

    A layer is recognised by content: gzip by its magic bytes, base64 when the whole
    payload is base64 text and decodes to gzip or to a `#`-comment / text document.
    """
    for _ in range(max_layers):
        if data.startswith(GZIP_MAGIC):
            data = gunzip_bounded(data, limit=limit, what=what)
            continue
        if looks_like_base64(data):
            try:
                decoded = base64.b64decode(_WS.sub(b"", data), validate=True)
            except (binascii.Error, ValueError):
                return data
            if decoded.startswith(GZIP_MAGIC) or decoded.lstrip().startswith(b"#"):
                data = decoded
                continue
        return data
    raise UserDataInvalid(f"{what} has too many encoding layers", max_layers=max_layers)

"""Bounded decoding of untrusted bytes: base64 and gzip layers, detected by content.

Everything here is pure and raises `UserDataInvalid` with a reason; nothing is retried,
because bad input does not get better.  Sizes are checked before any decoding, so an
oversized body is reported as too large, not as whatever its first bad byte looks like.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib

from guest_agent.errors import UserDataInvalid

GZIP_MAGIC = b"\x1f\x8b"
_B64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")  # \s: ASCII whitespace, what bytes.split() splits on
_CHUNK = 4096


def b64_decoded_size(stripped_len: int) -> int:
    """An upper bound of what `stripped_len` base64 characters (no whitespace) decode to."""
    return (stripped_len + 3) // 4 * 3


def _refuse_oversized_b64(stripped: bytes, *, limit: int, what: str) -> None:
    """Refuse base64 text (whitespace removed) that would decode to more than `limit` bytes."""
    if b64_decoded_size(len(stripped)) - stripped[-2:].count(b"=") > limit:
        raise UserDataInvalid(f"{what} is larger than the size limit", limit_bytes=limit)


def b64decode_strict(data: bytes, *, what: str, limit: int | None = None) -> bytes:
    """Standard-alphabet base64 with any whitespace removed first, then validated.

    Python's `b64decode` silently drops invalid characters unless `validate=True`;
    cloud-init strips all whitespace (IMDS and OVF bodies carry line breaks), and so does Go's
    `base64.NewDecoder` (CAA's initdata reader) for CR and LF.  With `limit`, a body that would
    decode to more than `limit` bytes is refused as too large before it is decoded.
    """
    stripped = _strip_ws(data)
    if limit is not None:
        _refuse_oversized_b64(stripped, limit=limit, what=what)
    try:
        return base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UserDataInvalid(f"{what} is not valid base64", error=str(exc)[:80]) from exc


def _strip_ws(data: bytes) -> bytes:
    return b"".join(data.split())


def looks_like_base64(data: bytes) -> bool:
    stripped = _strip_ws(data)
    return len(stripped) >= 4 and len(stripped) % 4 == 0 and _B64_TEXT.fullmatch(data) is not None


def gunzip_bounded(data: bytes, *, limit: int, what: str) -> bytes:
    """Decompress a gzip file, refusing to produce more than `limit` bytes in total (gzip bombs).

    A gzip file may hold several members back to back (RFC 1952 §2.2; `cat a.gz b.gz`): every
    member is decoded and the outputs concatenated, as Go's `gzip.Reader` does in its default
    multistream mode (CAA's initdata decoder and the verifier side), so the digest covers the
    same bytes on both sides.  Like Go's reader, anything after a member that is not another
    complete member is an error (Python's `gzip` module would skip trailing zeros).
    """
    out = bytearray()
    view, pos = memoryview(data), 0
    try:
        while True:
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            while not d.eof:
                if pos >= len(data):
                    raise UserDataInvalid(f"{what} is a truncated gzip stream")
                # Small chunks: zlib copies what follows a member into unused_data, so feeding the
                # whole rest would copy it once per member (quadratic in a flood of empty members).
                chunk = view[pos : pos + _CHUNK]
                pos += len(chunk)
                out += d.decompress(chunk, limit + 1 - len(out))
                if len(out) > limit or d.unconsumed_tail:
                    raise UserDataInvalid(f"{what} decompresses to more than the size limit", limit_bytes=limit)
            pos -= len(d.unused_data)
            if pos == len(data):
                return bytes(out)
            if not data.startswith(GZIP_MAGIC, pos):
                raise UserDataInvalid(f"{what} has data after its gzip stream", trailing_bytes=len(data) - pos)
    except zlib.error as exc:
        raise UserDataInvalid(f"{what} is not valid gzip", error=str(exc)[:80]) from exc


def unwrap_layers(data: bytes, *, limit: int, what: str, max_layers: int = 4) -> bytes:
    """Peel up to `max_layers` optional gzip and base64 layers (in any order) until plain content remains.

    A layer is recognised by content: gzip by its magic bytes, base64 when the whole payload is
    base64 text and decodes to gzip or to UTF-8 text.  Base64 text is never itself a valid
    `#cloud-config` (it cannot hold a `key:`), so peeling it loses nothing; CAA's Azure and GCP
    readers base64-decode the body once, the `#cloud-config` line being optional.
    """
    for layers in range(max_layers + 1):
        if data.startswith(GZIP_MAGIC):
            layer = "gzip"
        elif looks_like_base64(data):
            stripped = _strip_ws(data)
            _refuse_oversized_b64(stripped, limit=limit, what=what)
            try:
                decoded = base64.b64decode(stripped, validate=True)
            except (binascii.Error, ValueError):
                return data
            if not decoded.startswith(GZIP_MAGIC):
                try:
                    decoded.decode("utf-8")
                except UnicodeDecodeError:
                    return data
            layer = "base64"
        else:
            return data
        if layers == max_layers:
            raise UserDataInvalid(f"{what} has too many encoding layers", max_layers=max_layers)
        data = gunzip_bounded(data, limit=limit, what=what) if layer == "gzip" else decoded
    raise AssertionError("unreachable")  # the loop returns or raises on its last pass

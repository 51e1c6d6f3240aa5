"""One HTTP/1.1 exchange on a raw socket, bounded in time and size, for every metadata client
and the Azure wireserver.

Why not `requests` or `http.client`: `requests` costs ~100 ms to import and `http.client` ~25 ms
(it pulls in the `email` package), against ~7 ms for `socket`; and neither bounds a whole
exchange: their timeouts apply to each socket operation, so a server that drips one byte
every few seconds, or sends `100 Continue` forever, holds a request for as long as it likes.
WALinuxAgent (Azure/WALinuxAgent azurelinuxagent/common/utils/restutil.py) also talks to the
wireserver without a third-party client.

What an exchange guarantees:

* a TOTAL deadline (connect + send + status line + headers + body): the socket timeout is
  recomputed from a monotonic deadline before every send/recv, so no server can hold it longer;
* one connection per exchange (`Connection: close`), no proxy (nothing reads the environment),
  no redirects (a 3xx is returned like any status), Nagle off (TCP_NODELAY);
* every transport fault (refused, reset, timeout, short body, malformed status line or headers,
  too many or too long headers, bad, duplicate or conflicting Content-Length, unknown
  Transfer-Encoding, bad Content-Encoding, interim 1xx answers past a few) raises `Retry`,
  so the caller's loop retries until its own deadline;
* a body larger than `max_body` raises `ResponseTooLarge`, reported as such.

`parse_head` (pure) is separate from the socket loop; Retry-After and the status classification
shared by every client are in transport.py.
"""

from __future__ import annotations

import os
import socket
import time
import zlib

from guest_agent.errors import MetadataUnavailable
from guest_agent.transport import Retry

MAX_HEAD_BYTES = 64 * 1024  # status line + headers of one answer (http.client's _MAXLINE is 64 KiB per line)
MAX_HEADERS = 100  # http.client's _MAXHEADERS
MAX_INTERIM = 8  # 1xx answers skipped before the exchange is given up as a fault
MAX_CHUNK_LINE = 1024  # a chunk-size line with extensions, or a trailer line
RECV_BYTES = 64 * 1024

# Byte classes of RFC 9110 §5.1 tokens and §5.5 field values, checked with bytes.translate:
# no regular expression to compile at import.
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VALUE_BYTES = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_SEND_BYTES = b"\t" + bytes(range(0x20, 0x7F))  # what we send: visible ASCII, space and tab


def _only(data: bytes, allowed: bytes) -> bool:
    return not data.translate(None, allowed)


class ResponseTooLarge(MetadataUnavailable):
    """The answer's body is larger than the caller's bound (refused, never truncated)."""


# The values below are plain classes with __slots__: a NamedTuple costs ~1.2 M instructions at
# import (typing compiles each string annotation), on every boot (valgrind's callgrind).


class Response:
    """An answer: status, headers (lower-case names; a repeated header keeps its last value),
    body (after any Content-Encoding)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Target:
    """Where a request goes: host, port, path (with the query string)."""

    __slots__ = ("host", "path", "port")

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host = host
        self.port = port
        self.path = path


def split_url(url: str) -> Target:
    """`http://host[:port][/path?query]`; anything else is a configuration error."""
    from guest_agent.errors import ConfigError

    if not url.startswith("http://"):
        raise ConfigError("only http:// URLs are supported for metadata services", url=url[:200])
    rest = url[len("http://") :]
    slash = rest.find("/")
    authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    host, port = authority, 80
    if authority.startswith("["):
        end = authority.find("]")
        host, tail = authority[1:end], authority[end + 1 :]
        if tail.startswith(":"):
            port = _port(tail[1:], url)
    elif ":" in authority:
        host, _, p = authority.rpartition(":")
        port = _port(p, url)
    if not host or "@" in host or not host.isascii() or any(c in host for c in "/?#\\ \t\r\n"):
        raise ConfigError("a metadata URL needs an ASCII host (and no user info)", url=url[:200])
    return Target(host, port, path)


def _port(text: str, url: str) -> int:
    from guest_agent.errors import ConfigError

    if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
        raise ConfigError("a metadata URL has an invalid port", url=url[:200])
    return int(text)


# --------------------------------------------------------------------------- pure parsing


class Head:
    """Status line and headers of an answer, and how its body is framed."""

    __slots__ = ("chunked", "content_length", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], content_length: int | None, chunked: bool) -> None:
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked


def parse_head(raw: bytes) -> Head:
    """Status line and header fields (without the blank line); `Retry` for anything malformed."""
    lines = raw.split(b"\r\n") if b"\r\n" in raw else raw.split(b"\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, phrase = rest.partition(b" ")
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(code) != 3
        or not code.isdigit()
        or code[:1] == b"0"
        or not _only(phrase, _VALUE_BYTES)
    ):
        raise Retry(f"malformed status line ({lines[0][:40]!r})")
    if len(lines) - 1 > MAX_HEADERS:
        raise Retry(f"too many header fields (more than {MAX_HEADERS})")
    headers: dict[str, str] = {}
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not _only(name, _TOKEN_BYTES):
            # includes obsolete line folding (a line starting with whitespace), refused by RFC 9112 §5.2
            raise Retry(f"malformed header field ({line[:40]!r})")
        value = value.strip(b" \t")
        if not _only(value, _VALUE_BYTES):
            raise Retry(f"malformed header value for {name[:40].decode('ascii')}")
        key = name.decode("ascii").lower()
        if key == "content-length":
            lengths.extend(v.strip(b" \t") for v in value.split(b","))
        elif key == "transfer-encoding":
            encodings.extend(v.strip(b" \t").lower() for v in value.split(b","))
        headers[key] = value.decode("latin-1")
    length = None
    if lengths:
        # RFC 9112 §6.3: repeated or list-valued lengths must all agree, and be digits only.
        if len(set(lengths)) != 1 or not (lengths[0].isdigit() and len(lengths[0]) <= 18):
            raise Retry("bad or conflicting Content-Length")
        length = int(lengths[0])
    chunked = False
    if encodings:
        if encodings != [b"chunked"]:
            raise Retry("unsupported Transfer-Encoding")
        if length is not None:
            raise Retry("both Transfer-Encoding and Content-Length (a smuggling attempt or a broken server)")
        chunked = True
    return Head(int(code), headers, length, chunked)


# --------------------------------------------------------------------------- the exchange


def _fault(exc: OSError) -> Retry:
    if isinstance(exc, TimeoutError):
        return Retry("timed out")
    return Retry(f"connection failed ({os.strerror(exc.errno) if exc.errno else type(exc).__name__})")


def _connect(host: bytes, port: int, timeout: float) -> socket.socket:
    """`socket.create_connection` for a host given as bytes: each address getaddrinfo gives, in
    order, until one connects."""
    err: OSError = OSError("getaddrinfo returned no address")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            err = exc
            continue
        return sock
    raise err


class _Reader:
    """Buffered reads from a socket, each recv bounded by what is left of the deadline."""

    def __init__(self, sock: socket.socket, end: float) -> None:
        self.sock = sock
        self.end = end
        self.buf = bytearray()
        self.eof = False

    def fill(self) -> None:
        left = self.end - time.monotonic()
        if left <= 0:
            raise Retry("timed out (the exchange's deadline passed)")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(RECV_BYTES)
        except OSError as exc:
            raise _fault(exc) from None
        if not data:
            self.eof = True
        self.buf += data

    def head(self) -> bytes:
        start = 0
        while True:
            i = self.buf.find(b"\r\n\r\n", start)
            j = self.buf.find(b"\n\n", start)
            cut = min(k for k in (i, j) if k >= 0) if max(i, j) >= 0 else -1
            if cut >= 0:
                sep = 4 if cut == i else 2
                raw = bytes(self.buf[:cut])
                del self.buf[: cut + sep]
                return raw
            if len(self.buf) > MAX_HEAD_BYTES:
                raise Retry(f"response headers longer than {MAX_HEAD_BYTES} bytes")
            if self.eof:
                raise Retry("connection closed before the response headers" if self.buf else "empty response")
            start = max(0, len(self.buf) - 3)
            self.fill()

    def exactly(self, n: int, what: str) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise Retry(f"connection closed in the {what} ({len(self.buf)} of {n} bytes)")
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                out = bytes(self.buf[:i]).rstrip(b"\r")
                del self.buf[: i + 1]
                return out
            if len(self.buf) > MAX_CHUNK_LINE:
                raise Retry("malformed chunked body (line too long)")
            if self.eof:
                raise Retry("connection closed in the chunked body")
            self.fill()

    def to_eof(self, limit: int) -> bytes:
        while not self.eof:
            if len(self.buf) > limit:
                raise ResponseTooLarge("the answer is larger than the size limit", limit_bytes=limit)
            self.fill()
        return bytes(self.buf)


def _chunked(r: _Reader, limit: int) -> bytes:
    body = bytearray()
    while True:
        size_text = r.line().split(b";", 1)[0].strip(b" \t")
        if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise Retry("malformed chunked body (chunk size)")
        size = int(size_text, 16)
        if size == 0:
            for _ in range(MAX_HEADERS + 1):  # trailer fields, then the blank line
                if not r.line():
                    return bytes(body)
            raise Retry("malformed chunked body (too many trailer fields)")
        if len(body) + size > limit:
            raise ResponseTooLarge("the answer is larger than the size limit", limit_bytes=limit)
        body += r.exactly(size, "chunked body")
        if r.line():  # the CRLF that ends the chunk's data, nothing before it
            raise Retry("malformed chunked body (no line break after a chunk)")


def _decode(body: bytes, encoding: str | None, limit: int) -> bytes:
    """We never send Accept-Encoding; a server that compresses anyway is decoded (gzip) within
    the bound, and a body that does not match its label is a fault, like a short body."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity" or not body:
        return body
    if enc not in ("gzip", "x-gzip"):
        raise Retry(f"unsupported Content-Encoding ({enc[:20]})")
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        raise Retry("the body is not the gzip its Content-Encoding says") from None
    if len(out) > limit:
        raise ResponseTooLarge("the answer decompresses to more than the size limit", limit_bytes=limit)
    if not d.eof:
        raise Retry("truncated gzip body")
    return out


def _request_bytes(method: str, t: Target, headers: dict[str, str], body: bytes | None) -> bytes:
    host = f"[{t.host}]" if ":" in t.host else t.host
    lines = [f"{method} {t.path} HTTP/1.1", f"Host: {host}" + ("" if t.port == 80 else f":{t.port}")]
    lines.append("Connection: close")
    if body is not None or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body or b'')}")
    for k, v in headers.items():
        # Values come from config and from earlier answers (session tokens): never let one
        # carry a line break into the request.
        if not (v.isascii() and k.isascii() and _only(v.encode(), _SEND_BYTES) and _only(k.encode(), _TOKEN_BYTES)):
            raise Retry(f"refusing to send header {k[:40]!r}: it holds control or non-ASCII characters")
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


def exchange(
    method: str,
    url: str | Target,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    budget_s: float,
    connect_timeout_s: float,
    max_body: int,
) -> Response:
    """Send one request and read the whole answer within `budget_s` (connect included).

    Raises `Retry` on any transport fault, `ResponseTooLarge` past `max_body` bytes.
    """
    t = split_url(url) if isinstance(url, str) else url
    end = time.monotonic() + max(budget_s, 0.001)
    data = _request_bytes(method, t, headers or {}, body)
    try:
        # The host as bytes (split_url allows ASCII only): getaddrinfo encodes a str with the
        # "idna" codec, which imports stringprep and unicodedata (~2 ms) for an IP literal.
        host = t.host.encode("ascii")
        sock = _connect(host, t.port, max(min(connect_timeout_s, budget_s), 0.001))
    except OSError as exc:
        raise _fault(exc) from None
    try:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            left = end - time.monotonic()
            if left <= 0:
                raise Retry("timed out (the exchange's deadline passed)")
            sock.settimeout(left)
            sock.sendall(data)
        except OSError as exc:
            raise _fault(exc) from None
        r = _Reader(sock, end)
        for _ in range(MAX_INTERIM + 1):
            head = parse_head(r.head())
            if head.status >= 200:
                break
            if head.status == 101:
                raise Retry("unexpected 101 Switching Protocols")
        else:
            raise Retry(f"more than {MAX_INTERIM} interim (1xx) answers")
        if method == "HEAD" or head.status in (204, 304):
            raw = b""
        elif head.chunked:
            raw = _chunked(r, max_body)
        elif head.content_length is not None:
            if head.content_length > max_body:
                raise ResponseTooLarge(
                    "the answer is larger than the size limit", limit_bytes=max_body, length=head.content_length
                )
            raw = r.exactly(head.content_length, "body")
        else:
            raw = r.to_eof(max_body)
            if len(raw) > max_body:
                raise ResponseTooLarge("the answer is larger than the size limit", limit_bytes=max_body)
        return Response(head.status, head.headers, _decode(raw, head.headers.get("content-encoding"), max_body))
    finally:
        sock.close()

"""One HTTP/1.1 exchange, bounded in time and size, for every metadata client and the Azure
wireserver.

h11 (python-hyper's sans-IO HTTP/1.1 library) frames the exchange: the request it writes, and in
the answer the status line, header fields, interim (1xx) answers and the body by Content-Length,
chunked coding or connection close.  This module owns the socket and the bounds, because
`http.client`'s and `requests`' timeouts apply to each socket operation: a server that drips
one byte every few seconds, or sends `100 Continue` forever, would hold a request for as long
as it likes.  WALinuxAgent (Azure/WALinuxAgent azurelinuxagent/common/utils/restutil.py) also
talks to the wireserver without a third-party client.

What an exchange guarantees:

* a TOTAL deadline (connect + send + status line + headers + body): the socket timeout is
  recomputed from a monotonic deadline before every send/recv, so no server can hold it longer;
* one connection per exchange (`Connection: close`), no proxy (nothing reads the environment),
  no redirects (a 3xx is returned like any status), Nagle off (TCP_NODELAY);
* every transport fault (refused, reset, timeout, short body, anything h11 refuses as HTTP/1.1,
  a status line or header block past MAX_HEAD_BYTES, more than MAX_HEADERS fields, both
  Content-Length and Transfer-Encoding, a Content-Encoding (we ask for identity, decode nothing),
  interim 1xx answers past a few) raises `Retry`, so the caller's loop retries until its own
  deadline;
* a body larger than `max_body` raises `ResponseTooLarge`, reported as such.

Retry-After and the status classification shared by every client are in transport.py.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.parse
from dataclasses import dataclass

import h11

from guest_agent.errors import ConfigError, MetadataUnavailable
from guest_agent.transport import Retry

MAX_HEAD_BYTES = 64 * 1024  # one status line + header block, or a chunk line, or trailers (h11's buffer bound)
MAX_HEADERS = 100  # http.client's _MAXHEADERS
MAX_INTERIM = 8  # 1xx answers skipped before the exchange is given up as a fault
RECV_BYTES = 64 * 1024


class ResponseTooLarge(MetadataUnavailable):
    """The answer's body is larger than the caller's bound (refused, never truncated)."""


class Response:
    """An answer: status, headers (lower-case names; a repeated header keeps its last value), body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: host, port, path (with the query string)."""

    host: str
    port: int
    path: str


def url_problem(url: str) -> str | None:
    """Why `url` is not `http://host[:port][/path[?query]]`, or None: the one reader of metadata
    URLs (config checks them with it when it loads, `split_url` before every exchange)."""
    # urlsplit drops tabs and newlines silently and forgets an empty `#`; user info has no place.
    if not url.startswith("http://") or any(c in url for c in " \t\r\n@#"):
        return "must be an http:// URL with a host (no credentials or fragment)"
    try:
        parts = urllib.parse.urlsplit(url)  # refuses an unclosed or invalid [IPv6] literal
        port = parts.port  # refuses a port past 65535
    except ValueError:
        return "must be an http:// URL with a valid host and port"
    if not parts.hostname or not parts.hostname.isascii():
        return "must be an http:// URL with an ASCII host"
    # After an [IPv6] literal only `:port`; a port of ASCII digits only (int() takes others).
    after_literal = parts.netloc.partition("]")[2] if parts.netloc.startswith("[") else ""
    digits = parts.netloc.rpartition("]")[2].partition(":")[2]
    if after_literal and not after_literal.startswith(":"):
        return "has an invalid port"
    if port == 0 or (digits and not (digits.isascii() and digits.isdigit())):
        return "has an invalid port"
    return None


def split_url(url: str) -> Target:
    """The host, port and path of a metadata URL; anything `url_problem` refuses is a ConfigError."""
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(f"a metadata URL {problem}", url=url[:200])
    parts = urllib.parse.urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.hostname or "", parts.port or 80, path)


# --------------------------------------------------------------------------- the exchange


def _fault(exc: OSError) -> Retry:
    if isinstance(exc, TimeoutError):
        return Retry("timed out")
    return Retry(f"connection failed ({os.strerror(exc.errno) if exc.errno else type(exc).__name__})")


def _request_bytes(conn: h11.Connection, method: str, t: Target, headers: dict[str, str], body: bytes | None) -> bytes:
    host = f"[{t.host}]" if ":" in t.host else t.host
    # identity only (as http.client, and so WALinuxAgent, asks): RFC 9110 §12.5.3 then rules out a
    # compressed answer, so there is nothing to decompress.
    fields = [
        ("Host", host + ("" if t.port == 80 else f":{t.port}")),
        ("Connection", "close"),
        ("Accept-Encoding", "identity"),
    ]
    if body is not None or method in ("POST", "PUT"):
        fields.append(("Content-Length", str(len(body or b""))))
    fields.extend(headers.items())
    try:
        # Header values come from config and from earlier answers (session tokens): h11 refuses
        # a line break, a control character or (a str it cannot encode as ASCII) anything else.
        events: list[h11.Event] = [h11.Request(method=method, target=t.path, headers=fields)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        out = b"".join(conn.send(e) or b"" for e in events)  # (h11 0.14 types send() as bytes | None)
    except (h11.LocalProtocolError, UnicodeEncodeError):
        raise Retry(
            "refusing to send header fields or a path that HTTP/1.1 does not allow (control or non-ASCII)"
        ) from None
    return out


def _next_event(conn: h11.Connection, sock: socket.socket, end: float) -> object:
    """h11's next event, receiving as needed; each recv is bounded by what is left of the deadline."""
    while True:
        try:
            event = conn.next_event()
        except (h11.RemoteProtocolError, ValueError) as exc:  # ValueError: h11 0.14's int() of a huge length
            raise Retry(f"malformed answer ({str(exc)[:80]})") from None
        if event is not h11.NEED_DATA:
            return event
        left = end - time.monotonic()
        if left <= 0:
            raise Retry("timed out (the exchange's deadline passed)")
        sock.settimeout(left)
        try:
            data = sock.recv(RECV_BYTES)
        except OSError as exc:
            raise _fault(exc) from None
        if not data and conn.their_state is h11.SEND_RESPONSE:
            raise Retry("connection closed before the response headers")
        conn.receive_data(data)  # b"" is the peer's FIN: h11 then ends a read-to-close body or refuses a short one


def _head(conn: h11.Connection, sock: socket.socket, end: float) -> h11.Response:
    for _ in range(MAX_INTERIM + 1):
        event = _next_event(conn, sock, end)
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                raise Retry("unexpected 101 Switching Protocols")
            continue
        if not isinstance(event, h11.Response):
            raise Retry("connection closed before the response headers")
        if event.http_version not in (b"1.0", b"1.1"):
            raise Retry(f"malformed status line (HTTP/{event.http_version[:8]!r})")
        if len(event.headers) > MAX_HEADERS:
            raise Retry(f"too many header fields (more than {MAX_HEADERS})")
        return event
    raise Retry(f"more than {MAX_INTERIM} interim (1xx) answers")


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
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    data = _request_bytes(conn, method, t, headers or {}, body)
    try:
        # The host as bytes (split_url allows ASCII only; getaddrinfo takes bytes, typeshed says
        # str): getaddrinfo encodes a str with the "idna" codec, which imports stringprep and
        # unicodedata (~2 ms) for an IP literal, after the route is up.
        addr = (t.host.encode("ascii"), t.port)
        sock = socket.create_connection(addr, max(min(connect_timeout_s, budget_s), 0.001))  # type: ignore[arg-type]
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
        head = _head(conn, sock, end)
        fields = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
        if "transfer-encoding" in fields and ("content-length" in fields or head.http_version == b"1.0"):
            # RFC 9112 §6.1, §6.3: h11 lets Transfer-Encoding win; the pair "ought to be handled as an
            # error", and so must Transfer-Encoding in an HTTP/1.0 answer.
            raise Retry("Transfer-Encoding with Content-Length or in HTTP/1.0 (a smuggling attempt or a broken server)")
        length = fields.get("content-length", "")  # digits only, one value: h11 checked (not their count)
        has_body = method != "HEAD" and head.status_code not in (204, 304)
        if has_body and length and (len(length) > 18 or int(length) > max_body):
            raise ResponseTooLarge("the answer is larger than the size limit", limit_bytes=max_body, length=length[:24])
        raw = bytearray()
        while True:
            event = _next_event(conn, sock, end)
            if isinstance(event, h11.Data):
                raw += event.data
                if len(raw) > max_body:
                    raise ResponseTooLarge("the answer is larger than the size limit", limit_bytes=max_body)
            elif isinstance(event, h11.EndOfMessage):
                if len(event.headers) > MAX_HEADERS:
                    raise Retry(f"malformed chunked body (more than {MAX_HEADERS} trailer fields)")
                break
            else:
                raise Retry("connection closed in the body")
        encoding = fields.get("content-encoding", "identity").strip().lower()
        if raw and encoding != "identity":
            # We asked for identity (docs/protocols.md §7): a coded body is a broken answer, not ours to decode.
            raise Retry(f"unsupported Content-Encoding ({encoding[:20]})")
        return Response(head.status_code, fields, bytes(raw))
    finally:
        sock.close()

"""A fault-injecting HTTP server on 127.0.0.1: real sockets, one misbehaviour per path.

`GET /fault/<name>` (any method, any query) answers with the fault `<name>`; every other path
gets a plain 404.  The drips go on until the client hangs up (or `MAX_FAULT_S`), so only the
client's own deadline can end them.  Used by the tests as IMDS or as the wireserver.
"""

from __future__ import annotations

import gzip
import socket
import socketserver
import struct
import time
from collections.abc import Callable

from tests.fakecloud.server import Served

DRIP_S = 0.1  # one byte (or one interim answer) this often: slower than no deadline would notice
MAX_FAULT_S = 30.0  # a safety net for the test process, far past any deadline a test sets

Send = Callable[[bytes], None]


def _drip(send: Send, data: bytes, *, repeat: bytes = b"") -> None:
    end = time.monotonic() + MAX_FAULT_S
    for i in range(len(data)):
        send(data[i : i + 1])
        time.sleep(DRIP_S)
    while repeat and time.monotonic() < end:
        send(repeat)
        time.sleep(DRIP_S)


def _head(status: str = "200 OK", *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode()


def drip_headers(send: Send) -> None:
    _drip(send, b"HTTP/1.1 200 OK\r\n", repeat=b"X")  # a header line that never ends


def drip_body(send: Send) -> None:
    send(_head("200 OK", "Content-Length: 10000"))
    _drip(send, b"", repeat=b"A")


def drip_chunked(send: Send) -> None:
    send(_head("200 OK", "Transfer-Encoding: chunked"))
    _drip(send, b"", repeat=b"1\r\nA\r\n")  # a valid one-byte chunk at a time, never the last


def endless_continue(send: Send) -> None:
    _drip(send, b"", repeat=b"HTTP/1.1 100 Continue\r\n\r\n")


def endless_continue_fast(send: Send) -> None:
    end = time.monotonic() + MAX_FAULT_S
    while time.monotonic() < end:
        send(b"HTTP/1.1 100 Continue\r\n\r\n" * 50)
        time.sleep(0.01)


def reset_mid_body(send: Send) -> None:
    send(_head("200 OK", "Content-Length: 1000") + b"A" * 10)
    raise ConnectionResetError  # the handler closes with SO_LINGER 0: an RST


def short_body(send: Send) -> None:
    send(_head("200 OK", "Content-Length: 1000") + b"A" * 10)  # then FIN


def bad_length(send: Send) -> None:
    send(_head("200 OK", "Content-Length: ten") + b"0123456789")


def conflicting_length(send: Send) -> None:
    send(_head("200 OK", "Content-Length: 10", "Content-Length: 12") + b"0123456789ab")


def unicode_length(send: Send) -> None:
    send(_head("200 OK").replace(b"\r\n\r\n", "\r\nContent-Length: ²\r\n\r\n".encode()) + b"01")


def gzip_lie(send: Send) -> None:
    send(_head("200 OK", "Content-Length: 10", "Content-Encoding: gzip") + b"not gzip!!")


def truncated_gzip(send: Send) -> None:
    body = gzip.compress(b"#cloud-config\n" * 100)[:-12]
    send(_head("200 OK", f"Content-Length: {len(body)}", "Content-Encoding: gzip") + body)


def unknown_encoding(send: Send) -> None:
    send(_head("200 OK", "Content-Length: 4", "Content-Encoding: br") + b"abcd")


def bad_status(send: Send) -> None:
    send(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n")


def not_http(send: Send) -> None:
    send(b"\x00\xffSSH-2.0-OpenSSH\r\n\r\n")


def too_many_headers(send: Send) -> None:
    send(_head("200 OK", *[f"X-{i}: {i}" for i in range(500)], "Content-Length: 0"))


def endless_headers(send: Send) -> None:
    send(b"HTTP/1.1 200 OK\r\n")
    end = time.monotonic() + MAX_FAULT_S
    while time.monotonic() < end:
        send(b"X-Padding: " + b"p" * 1000 + b"\r\n")


def folded_header(send: Send) -> None:
    send(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 0\r\n\r\n")


def smuggling(send: Send) -> None:
    send(_head("200 OK", "Content-Length: 5", "Transfer-Encoding: chunked") + b"0\r\n\r\n")


def bad_chunk(send: Send) -> None:
    send(_head("200 OK", "Transfer-Encoding: chunked") + b"zz\r\nAA\r\n0\r\n\r\n")


def switching_protocols(send: Send) -> None:
    send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")


def empty(send: Send) -> None:
    pass  # accept, read the request, close without a byte


def retry_after_unicode(send: Send) -> None:
    send(_head("503 Service Unavailable", "Retry-After: ²", "Content-Length: 0"))


def huge_body(send: Send) -> None:
    send(_head("200 OK", "Content-Length: 100000000"))
    end = time.monotonic() + MAX_FAULT_S
    while time.monotonic() < end:
        send(b"A" * 65536)


def huge_chunked(send: Send) -> None:
    send(_head("200 OK", "Transfer-Encoding: chunked"))
    end = time.monotonic() + MAX_FAULT_S
    while time.monotonic() < end:
        send(b"10000\r\n" + b"A" * 65536 + b"\r\n")


FAULTS: dict[str, Callable[[Send], None]] = {
    f.__name__.replace("_", "-"): f
    for f in (
        drip_headers,
        drip_body,
        drip_chunked,
        endless_continue,
        endless_continue_fast,
        reset_mid_body,
        short_body,
        bad_length,
        conflicting_length,
        unicode_length,
        gzip_lie,
        truncated_gzip,
        unknown_encoding,
        bad_status,
        not_http,
        too_many_headers,
        endless_headers,
        folded_header,
        smuggling,
        bad_chunk,
        switching_protocols,
        empty,
        retry_after_unicode,
    )
}
# Too large is not a transport fault: the answer is refused as such (see the tests).
TOO_LARGE: dict[str, Callable[[Send], None]] = {"huge-body": huge_body, "huge-chunked": huge_chunked}


class FaultServer(Served):
    def __init__(self) -> None:
        self.hits: list[str] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(5.0)
                data = b""
                try:
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = sock.recv(4096)
                        if not chunk:
                            return
                        data += chunk
                except OSError:
                    return
                path = data.split(b" ", 2)[1].decode("latin-1") if data.count(b" ") >= 2 else "/"
                name = path.split("?")[0].removeprefix("/fault/").split("/")[0]  # /fault/<name>/anything
                outer.hits.append(name)
                fault = FAULTS.get(name) or TOO_LARGE.get(name)
                try:
                    if fault is None:
                        sock.sendall(_head("404 Not Found", "Content-Length: 0"))
                    else:
                        fault(sock.sendall)
                except ConnectionResetError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass  # the client gave up: the point of the exercise

        super().__init__(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler), "faults")

"""A small threaded HTTP server that records every request and answers from a handler.

Replies can be scripted per route: a queue of `Reply` objects consumed in order before
the cloud's normal behaviour takes over ("404, then 200").
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    raw_path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    t: float  # time.time() on arrival
    t_mono: float  # time.monotonic() on arrival

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Reply:
    status: int = 200
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (a slow server)
    drop: bool = False  # close the connection without any answer

    def data(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


Handler = Callable[[Request], Reply]


class Script:
    """Per-route queues of scripted replies; `take(route)` pops the next one or returns None."""

    def __init__(self, routes: dict[str, Iterable[Reply]] | None = None) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Reply]] = {k: deque(v) for k, v in (routes or {}).items()}

    def add(self, route: str, *replies: Reply) -> None:
        with self._lock:
            self._queues.setdefault(route, deque()).extend(replies)

    def take(self, route: str) -> Reply | None:
        with self._lock:
            q = self._queues.get(route)
            return q.popleft() if q else None


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # listen() backlog: a fleet of agents connects at once (bench/fleet.py)


class Lifecycle:
    """`with fake:` for anything with start() and stop(): every fake here (Served and the fakes
    that wrap one, e.g. wireserver.FakeWireserver)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Served(Lifecycle):
    """A threading socketserver on 127.0.0.1, served from a daemon thread: the lifecycle
    (url, start/stop) of every fake here (FakeServer, faults.FaultServer)."""

    def __init__(self, srv: socketserver.ThreadingTCPServer, name: str) -> None:
        srv.daemon_threads = True
        self._httpd = srv
        self._thread = threading.Thread(
            target=lambda: srv.serve_forever(poll_interval=0.05), name=f"fake-{name}", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class FakeServer(Served):
    def __init__(
        self, name: str, handler: Handler, *, host: str = "127.0.0.1", port: int = 0, log: IO[str] | None = None
    ) -> None:
        self.name = name
        self.handler = handler
        self.requests: list[Request] = []
        self._log = log
        self._lock = threading.Lock()
        self._event = threading.Condition(self._lock)
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # http.server sends headers and body in two writes; with Nagle on, a reused
            # connection stalls ~40 ms on the delayed ACK, which would swamp every timing.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = Request(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    raw_path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    t=time.time(),
                    t_mono=time.monotonic(),
                )
                reply = outer.handler(req)
                outer._record(req, reply)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    return
                data = reply.data()
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

        super().__init__(_Server((host, port), _H), name)

    def _record(self, req: Request, reply: Reply) -> None:
        with self._event:
            self.requests.append(req)
            self._event.notify_all()
            if self._log is not None:
                entry = {
                    "t": req.t,
                    "server": self.name,
                    "method": req.method,
                    "path": req.raw_path,
                    "status": None if reply.drop else reply.status,
                }
                if req.method in ("POST", "PUT") and req.body:
                    entry["body"] = req.body.decode("utf-8", "replace")
                self._log.write(json.dumps(entry) + "\n")
                self._log.flush()

    def wait_for(self, predicate: Callable[[list[Request]], bool], timeout_s: float = 10.0) -> bool:
        """Block until `predicate(requests)` holds (event-driven, for tests and the e2e)."""
        with self._event:
            return self._event.wait_for(lambda: predicate(self.requests), timeout=timeout_s)

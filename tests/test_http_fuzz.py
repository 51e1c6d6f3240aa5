"""Seeded mutation fuzz of the decoders of host-controlled HTTP and Azure answers: each raises
only the agent's own errors (`Retry`, `AgentError`) or returns, whatever the bytes.

Deterministic (fixed seeds) and bounded (a few thousand cases per decoder, well under a second
each); `GUEST_AGENT_FUZZ_CASES=100000 pytest tests/test_http_fuzz.py` runs longer.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_agent import httpio
from guest_agent.azure import wire
from guest_agent.clouds import http, ibmcloud
from guest_agent.errors import AgentError
from guest_agent.transport import Retry, parse_retry_after

CASES = int(os.environ.get("GUEST_AGENT_FUZZ_CASES", "2000"))
GOAL_STATE = (Path(__file__).parent / "fixtures/azure/goal_state.xml").read_bytes()
SEEDS: dict[str, list[bytes]] = {
    "head": [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Encoding: gzip\r\nRetry-After: 3",
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.0 503 Busy\nTransfer-Encoding: chunked\nX: y",
    ],
    "goal_state": [GOAL_STATE],
    "json": [b'{"access_token": "abc", "user_data": "#cloud-config\\n", "a": [1, {"b": null}]}'],
    "retry_after": [b"120", b"Thu, 01 Jan 1970 00:01:40 GMT"],
    "option_245": [b"A83F8110", b"a8:3f:81:10"],
}
INTERESTING = [
    b"\r\n",
    b"\n",
    b":",
    b"\x00",
    b"\xff",
    b"<",
    b">",
    b"&",
    b"[",
    b"{",
    b'"',
    b"\\",
    b"9" * 30,
    "²".encode(),
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = rng.choice(INTERESTING)
        elif op == 2 and b:
            del b[i : i + rng.randint(1, 16)]
        elif op == 3:
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[min(i, j) : max(i, j)][:256] * rng.randint(1, 4)  # duplicate a slice
        else:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(b)


def _retry_after(data: bytes) -> object:
    return parse_retry_after(data.decode("latin-1"), 0.0)


def _option_245(data: bytes) -> object:
    return wire.parse_option_245(data.decode("latin-1"))


def _json(data: bytes) -> object:
    for parse in (ibmcloud.parse_token, ibmcloud.parse_initialization):
        try:
            parse(data)
        except Retry:
            pass
    return http.json_depth(data)


DECODERS: dict[str, Callable[[bytes], object]] = {
    "head": httpio.parse_head,
    "goal_state": wire.parse_goal_state,
    "json": _json,
    "retry_after": _retry_after,
    "option_245": _option_245,
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_raises_only_agent_errors(name: str) -> None:
    rng = random.Random(name)
    decode = DECODERS[name]
    for n in range(CASES):
        data = mutate(rng, rng.choice(SEEDS[name]))
        try:
            decode(data)
        except (Retry, AgentError):
            pass
        except Exception as exc:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{name} case {n}: {type(exc).__name__}: {exc!r} on {data[:200]!r}") from None


ANSWERS = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\nContent-Encoding: gzip\r\n\r\n"
    + bytes.fromhex("1f8b0800000000000203cb48cdc9c95728cf2fca49e102002d3b08af0c000000"),
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Slow down\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\nno",
    b"HTTP/1.0 200 OK\r\n\r\nread to the end",
]


def test_whole_answers_over_a_socket_raise_only_agent_errors() -> None:
    """Mutated whole answers (chunked, gzip, interim, read-to-close) through a real socket."""
    import socket
    import threading

    rng = random.Random("socket")
    n_cases = max(CASES // 10, 50)
    payloads = [mutate(rng, rng.choice(ANSWERS)) for _ in range(n_cases)]
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for data in payloads:
            conn, _ = srv.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/"
    try:
        for n, data in enumerate(payloads):
            try:
                httpio.exchange("GET", url, budget_s=2.0, connect_timeout_s=1.0, max_body=4096)
            except (Retry, AgentError):
                pass
            except Exception as exc:  # pragma: no cover
                raise AssertionError(f"case {n}: {type(exc).__name__}: {exc!r} on {data[:200]!r}") from None
    finally:
        srv.close()

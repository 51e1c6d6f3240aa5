"""Property-based fuzzing of the decoders of host-controlled HTTP and Azure answers.

Targets: the goal-state XML parser (random, mutated and generated documents, deep and wide
trees, DTD and entity attempts, foreign encodings), the metadata JSON decoders (IBM token and
initialization answers, Azure IMDS userData), Retry-After (any text, non-ASCII digits, dates,
against `datetime.strptime`), HTTP answers through `httpio.exchange` (h11's framing and our
bounds) against a raw server on 127.0.0.1 (status lines and header blocks, Content-Length,
chunked, a Content-Encoding, interim answers, truncated and oversized bodies), and the
wireserver health client end to end.

Each call returns a bounded result or raises an `AgentError` subclass, or `Retry` where the
module documents it as its "transport fault, try again" signal (httpio, clouds/http.py); the
health client, which owns the retry loop, lets only `AgentError` out.  Anything else would end
the agent as exit 70, "internal error".

Budget and profile: tests/fuzzing.py (the same as test_fuzz_decoders.py).
"""

from __future__ import annotations

import calendar
import datetime
import gzip
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_agent import httpio
from guest_agent.azure import health, wire
from guest_agent.clouds import azure as azure_imds
from guest_agent.clouds import http, ibmcloud
from guest_agent.errors import AgentError, FabricError
from guest_agent.transport import RETRY_AFTER_MAX_S, Backoff, Deadline, Retry, parse_retry_after, retry_or_raise
from tests.fakecloud.wireserver import goal_state_xml
from tests.fuzzing import EDITS, FUZZ, mutate

GOAL_STATE = (Path(__file__).parent / "fixtures/azure/goal_state.xml").read_bytes()
SIGNALS = (Retry, AgentError)
# Edits that insert the bytes these decoders branch on, beside random ones.
TOKENS = [
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
    "\u00b2".encode(),
]
TOKEN_EDITS = st.lists(
    st.tuples(st.integers(0, 1 << 20), st.integers(0, 16), st.one_of(st.binary(max_size=8), st.sampled_from(TOKENS))),
    max_size=8,
)


def signalled(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or None when it raised one of the agent's own signals."""
    try:
        return fn()
    except SIGNALS:
        return None


# --- goal state ------------------------------------------------------------------------------


def goal_state(xml: bytes) -> wire.GoalState | None:
    """parse_goal_state raises only FabricError (GoalStateIncomplete is one) and bounds its ids."""
    try:
        gs = wire.parse_goal_state(xml)
    except FabricError:
        return None
    assert all(0 < len(v) <= 4096 for v in (gs.incarnation, gs.container_id, gs.role_instance_id))
    return gs


@FUZZ
@given(st.binary(max_size=2048))
def test_goal_state_random_bytes(data: bytes) -> None:
    goal_state(data)


@FUZZ
@given(TOKEN_EDITS)
def test_goal_state_mutated(edits: list[tuple[int, int, bytes]]) -> None:
    goal_state(mutate(GOAL_STATE, edits))


# An id the XML carries as it is: no markup characters, nothing XML 1.0 cannot hold, no \r
# (expat normalises line ends).
ID_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Cn"], exclude_characters="<>&"), max_size=40
)


@FUZZ
@given(ID_TEXT, ID_TEXT, ID_TEXT, st.booleans(), st.sampled_from([None, "http://schemas.microsoft.com/x", "urn:y"]))
def test_goal_state_generated(incarnation: str, container: str, instance: str, bom: bool, ns: str | None) -> None:
    """Differential: a well-formed goal state yields exactly its (stripped) ids, or a FabricError
    naming the empty one."""
    gs = goal_state(goal_state_xml(incarnation, container, instance, bom=bom, namespace=ns))
    if all(v.strip() for v in (incarnation, container, instance)):
        assert gs == wire.GoalState(incarnation.strip(), container.strip(), instance.strip())
    else:
        assert gs is None


ELEMENT_NAMES = st.sampled_from(
    ["GoalState", "Incarnation", "Container", "ContainerId", "RoleInstanceList", "RoleInstance", "InstanceId", "x"]
)
XML_TREES = st.recursive(
    st.text(max_size=12),
    lambda inner: st.tuples(ELEMENT_NAMES, st.lists(inner, max_size=5)),
    max_leaves=40,
)


def render(tree: object) -> bytes:
    """A (name, children) / text tree as XML, written with a worklist (no recursion)."""
    out: list[str] = []
    work: list[object] = [tree]
    while work:
        node = work.pop()
        if isinstance(node, str) and node.startswith("\0close:"):
            out.append(f"</{node[7:]}>")
        elif isinstance(node, str):
            out.append(node.replace("&", "&amp;").replace("<", "&lt;"))
        else:
            name, children = cast("tuple[str, list[object]]", node)
            out.append(f"<{name}>")
            work.append(f"\0close:{name}")
            work.extend(reversed(children))
    return "".join(out).encode("utf-8", "surrogatepass")


@FUZZ
@given(XML_TREES)
def test_goal_state_random_trees(tree: object) -> None:
    goal_state(render(("GoalState", [tree])))


@FUZZ
@given(st.integers(1, 5000), st.integers(0, 20_000), st.sampled_from(["x", "Container", "RoleInstance"]))
def test_goal_state_deep_and_wide(depth: int, width: int, name: str) -> None:
    inner = f"<{name}>" * depth + "<x/>" * width + f"</{name}>" * depth
    doc = f"<GoalState><Incarnation>1</Incarnation>{inner}</GoalState>".encode()
    gs = goal_state(doc)
    if depth + 1 >= wire.GOAL_STATE_MAX_DEPTH or depth + width + 2 > wire.GOAL_STATE_MAX_ELEMENTS:
        assert gs is None


DTDS = st.sampled_from(
    [
        '<!DOCTYPE GoalState [<!ENTITY e "{v}">]>',
        '<!DOCTYPE GoalState [<!ENTITY e SYSTEM "file:///etc/{v}">]>',
        '<!DOCTYPE GoalState SYSTEM "http://127.0.0.1:9/{v}.dtd">',
        '<!DOCTYPE GoalState [<!ENTITY % p "{v}"> %p;]>',
        '<!DOCTYPE GoalState [<!ENTITY a "{v}{v}{v}{v}"><!ENTITY e "&a;&a;&a;&a;&a;&a;&a;&a;">]>',
        '<!DOCTYPE GoalState [<!ELEMENT GoalState ANY><!ATTLIST GoalState a CDATA "{v}">]>',
        "",  # no DTD at all: &e; is then an undefined entity
    ]
)


@FUZZ
@given(DTDS, st.text(st.characters(codec="ascii", exclude_characters='"%&<>'), max_size=20), st.integers(0, 1 << 16))
def test_goal_state_dtd_and_entities_refused(dtd: str, value: str, where: int) -> None:
    """Whatever the DTD or entity, and wherever &e; is referenced, the document is refused."""
    text = GOAL_STATE.decode()
    body_at = text.index("<GoalState")
    tags = [i for i in range(body_at, len(text)) if text.startswith("</", i)]
    ref = tags[where % len(tags)]
    doc = text[:body_at] + dtd.replace("{v}", value) + text[body_at:ref] + "&e;" + text[ref:]
    assert goal_state(doc.encode()) is None


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32", "latin-1", "cp1252", "shift_jis"]


@FUZZ
@given(
    st.sampled_from(ENCODINGS),
    st.one_of(st.sampled_from([*ENCODINGS, "bogus", ""]), st.text(max_size=12)),
    st.text(max_size=8),
)
def test_goal_state_encodings(encoding: str, declared: str, incarnation: str) -> None:
    text = GOAL_STATE.decode().replace('encoding="utf-8"', f'encoding="{declared}"')
    text = text.replace("<Incarnation>1<", f"<Incarnation>1{incarnation.replace('<', '').replace('&', '')}<")
    goal_state(text.encode(encoding, "replace"))


def test_goal_state_long_ids_are_cut() -> None:
    """Regression: a 200 KB Incarnation came back whole (the cut took effect only after one
    oversized piece had been kept), and was echoed into every health report."""
    doc = GOAL_STATE.replace(b"<Incarnation>1", b"<Incarnation>" + b"7" * 200_000)
    gs = goal_state(doc)
    assert gs is not None and gs.incarnation == "7" * 4096


# --- metadata JSON ---------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


def nesting(value: object) -> int:
    """The depth of a decoded JSON value (a worklist, no recursion)."""
    deepest, work = 0, [(value, 0)]
    while work:
        v, d = work.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            work.extend((c, d + 1) for c in v.values())
        elif isinstance(v, list):
            work.extend((c, d + 1) for c in v)
    return deepest


def json_answer(body: bytes) -> None:
    """Every JSON decoder of a metadata answer on one body: Retry or AgentError, bounded results."""
    doc = signalled(lambda: http.parse_json(body, "x"))
    assert nesting(doc) <= http.JSON_MAX_DEPTH
    tok = signalled(lambda: ibmcloud.parse_token(body))
    assert tok is None or http.is_token(tok)
    ud = signalled(lambda: ibmcloud.parse_initialization(body))
    assert ud is None or (isinstance(ud, bytes) and 0 < len(ud) <= 4 * len(body))


@FUZZ
@given(
    st.one_of(JSON_VALUES, st.text(max_size=30)),
    JSON_VALUES,
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"]),
    TOKEN_EDITS,
)
def test_ibm_answers(token: object, extra: object, encoding: str, edits: list[tuple[int, int, bytes]]) -> None:
    doc = {"access_token": token, "user_data": token, "extra": extra}
    json_answer(mutate(json.dumps(doc, ensure_ascii=False).encode(encoding, "surrogatepass"), edits))


@FUZZ
@given(st.binary(max_size=1024))
def test_json_random_bytes(body: bytes) -> None:
    json_answer(body)


@FUZZ
@given(
    st.lists(
        st.sampled_from(['"', "\\", "[", "]", "{", "}", ":", ",", "1", "\u0122", "\u225b", "\u5b22"]), max_size=400
    ),
    st.sampled_from(["utf-8", "utf-16-le", "utf-16-be", "utf-32"]),
)
def test_json_brackets_and_quotes(tokens: list[str], encoding: str) -> None:
    """Soup of the characters json_depth's scan cares about, including ones whose UTF-16 form
    holds a quote byte (U+0122 is 22 01 in UTF-16-LE)."""
    json_answer("".join(tokens).encode(encoding))


def test_json_depth_cannot_be_hidden_by_utf16() -> None:
    """Regression: json.loads detects UTF-16/32 in bytes, while json_depth scanned the raw bytes
    for quotes, so a character holding a 0x22 byte hid real brackets from the depth bound: this
    answer came back nested 41 deep past JSON_MAX_DEPTH = 32.  Answers are UTF-8 (RFC 8259 §8.1)."""
    doc = '["\u0122", ' + "[" * 40 + '"x"' + "]" * 40 + "]"
    body = doc.encode("utf-16-le")
    with pytest.raises(Retry):
        http.parse_json(body, "x")
    with pytest.raises(Retry, match="nested deeper"):
        http.parse_json(doc.encode(), "x")


@FUZZ
@given(st.binary(max_size=512), EDITS)
def test_imds_user_data(raw: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    import base64

    for body in (raw, mutate(base64.b64encode(raw), edits)):
        try:
            out = azure_imds.parse_user_data(body)
        except AgentError:
            continue
        assert len(out) <= len(body)


@FUZZ
@given(st.one_of(st.text(max_size=24), st.sampled_from(["A83F8110", "a8:3f:81:10", "8:3f:81:1"]).map(str)), TOKEN_EDITS)
def test_dhcp_option_245(value: str, edits: list[tuple[int, int, bytes]]) -> None:
    """The wireserver address the host hands out in a DHCP lease: an IPv4 address or None."""
    text = mutate(value.encode("utf-8", "surrogatepass"), edits).decode("latin-1")
    addr = wire.parse_option_245(text)
    assert addr is None or (len(addr.split(".")) == 4 and all(0 <= int(o) <= 255 for o in addr.split(".")))


# --- Retry-After -----------------------------------------------------------------------------

NOW = 1_700_000_000.0


def retry_after(value: str) -> float | None:
    r = parse_retry_after(value, NOW)
    assert r is None or (math.isfinite(r) and 0.0 <= r <= RETRY_AFTER_MAX_S)
    return r


def bounded_wait(when: float) -> float | None:
    wait = max(0.0, when - NOW)
    return wait if wait <= RETRY_AFTER_MAX_S else None


@FUZZ
@given(st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_retry_after_any_text(value: str) -> None:
    retry_after(value)


@FUZZ
@given(st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=12), st.sampled_from(["", " ", "\t"]))
def test_retry_after_unicode_digits(digits: str, pad: str) -> None:
    """Only ASCII delta-seconds count: '٣' and '²' pass str.isdigit but are no HTTP delay."""
    r = retry_after(pad + digits + pad)
    if digits.isascii() and len(digits) <= 9:
        assert r == float(digits)
    else:
        assert r is None


@FUZZ
@given(
    st.sampled_from(["Mon", "Tue", "Sun", "mon", "Xyz"]),
    st.integers(0, 99),
    st.sampled_from(["Jan", "Feb", "Dec", "jan", "Foo"]),
    st.integers(0, 9999),
    st.tuples(st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)),
)
def test_retry_after_dates(day: str, dd: int, month: str, year: int, hms: tuple[int, int, int]) -> None:
    """A real calendar date and time is the delay to it (none past the bound); anything else is
    ignored.  The day name is not checked (email.utils skips it); two-digit years (RFC 5322 reads
    them as 19xx/20xx) are only checked for a bounded result."""
    value = f"{day}, {dd:02} {month} {year:04} {hms[0]:02}:{hms[1]:02}:{hms[2]:02} GMT"
    r = retry_after(value)
    month_no = {"jan": 1, "feb": 2, "dec": 12}.get(month.lower())
    if year < 100:
        return
    if month_no and 1 <= dd <= calendar.monthrange(year, month_no)[1] and hms[0] <= 23 and max(hms[1:]) <= 59:
        assert r == bounded_wait(calendar.timegm((year, month_no, dd, *hms, 0, 0, 0)))
    else:
        assert r is None


def strptime_retry_after(value: str) -> tuple[bool, float | None]:
    """(read, delay) of an IMF-fixdate as `datetime.strptime` reads it, an independent parser;
    read is False for text it does not take as one, or with a year below 1000 (RFC 5322 reads a
    two-digit year, zero-padded or not, as 19xx/20xx, strptime as the year itself)."""
    try:
        when = datetime.datetime.strptime(value.strip(), "%a, %d %b %Y %H:%M:%S GMT")
    except ValueError:
        return False, None
    if when.year < 1000:
        return False, None
    return True, bounded_wait(when.replace(tzinfo=datetime.UTC).timestamp())


FIXDATE_TOKENS = [b" ", b":", b",", b"GMT", b"0", b"9", "\u0663".encode(), b"\t", b"Feb", b"Sat", b"29", b"31", b"60"]


@FUZZ
@given(
    st.integers(-(10**10), 253402300799),
    st.integers(0, 60),
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 3), st.sampled_from(FIXDATE_TOKENS) | st.binary(max_size=3)),
        max_size=3,
    ),
)
def test_retry_after_agrees_with_strptime(t: int, second: int, edits: list[tuple[int, int, bytes]]) -> None:
    """Differential: every text strptime reads as an IMF-fixdate gives the same delay (well-formed
    dates across the whole range: leap days, second 60, before 1970, and near misses); what it
    does not read is ignored or a bounded delay (email.utils also reads other date forms)."""
    text = time.strftime(f"%a, %d %b %Y %H:%M:{second:02} GMT", time.gmtime(t))
    value = mutate(text.encode(), edits).decode("utf-8", "replace")
    read, expected = strptime_retry_after(value)
    got = retry_after(value)
    if read:
        assert got == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # strptime reads these as IMF-fixdates: the same delay
        ("Sat, 01 Jan 2000 00:00:00 GMT", "strptime"),
        ("Sat,  1 Jan 2000 00:00:00 GMT", "strptime"),
        ("sat, 01 Jan 2000 00:00:00 GMT", "strptime"),
        ("Sat, 01 Jan 2000 00:00:00 GMT ", "strptime"),
        (" Sat, 01 Jan 2000 00:00:00 GMT", "strptime"),
        ("Sat, 01 Jan 2000 00:00:0٣ GMT", "strptime"),
        ("Sat, 01 jan 2000 00:00:00 GMT", "strptime"),
        ("Fri, 31 Dec 9999 23:59:59 GMT", "strptime"),
        ("Thu, 01 Jan 1970 00:00:00 GMT", "strptime"),
        ("Wed, 31 Dec 1969 23:59:59 GMT", "strptime"),
        ("Tue, 14 Nov 2023 22:13:20 GMT", "strptime"),
        ("Tue, 14 Nov 2023 22:15:00 GMT", "strptime"),
        # not a date (a leap second included: datetime has none): ignored
        ("Sun, 29 Feb 2032 23:59:60 GMT", None),
        ("Mon, 31 Feb 2031 00:00:00 GMT", None),
        ("Sat, 00 Jan 2000 00:00:00 GMT", None),
        # other RFC 5322 spellings email.utils reads
        ("Sat, 01 Jan 2000 00:00:00 UTC", 0.0),
        ("Sat, 01 Jan 2000 0:00:000 GMT", 0.0),
        ("Tue, 14 Nov 2023 23:15:00 +0100", 100.0),
        ("Tue Nov 14 22:15:00 2023", 100.0),
    ],
)
def test_retry_after_edge_cases(value: str, expected: str | float | None) -> None:
    if expected == "strptime":
        read, expected = strptime_retry_after(value)
        assert read
    assert retry_after(value) == expected


@FUZZ
@given(st.integers(100, 999), st.dictionaries(st.sampled_from(["retry-after", "x"]), st.text(max_size=30)))
def test_status_classification(status: int, headers: dict[str, str]) -> None:
    """The one place a Retry-After reaches the retry loop: a bounded Retry, or the caller's error."""
    resp = httpio.Response(status, headers, b"")
    try:
        r = retry_or_raise(resp, "x", retry_status=lambda s: s >= 500, refused=FabricError, now=NOW)
    except FabricError:
        return
    assert r.retry_after_s is None or 0.0 <= r.retry_after_s <= RETRY_AFTER_MAX_S


# --- HTTP answers: status lines and header blocks -------------------------------------------

HEADER_NAMES = st.sampled_from(
    [
        "Content-Length",
        "Transfer-Encoding",
        "Content-Encoding",
        "Retry-After",
        "X-Ms-Thing",
        "content-length",
        "Bad Name",
    ]
)
HEADER_VALUES = st.one_of(
    st.sampled_from(["0", "5", "5, 5", "5,6", "-1", "0x10", " 7 ", "9" * 20, "chunked", "gzip, chunked", "identity"]),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
)
STATUS_LINES = st.one_of(
    st.tuples(
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1"]), st.integers(0, 1000), st.text(max_size=10)
    ).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
    st.sampled_from(["HTTP/1.1 200", "HTTP/1.1 ²00 OK", "HTTP/1.1  200 OK", "HTTP/1.1 200 OK\x00"]),
)
HEADS = st.tuples(
    STATUS_LINES, st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6), st.sampled_from(["\r\n", "\n"])
).map(lambda t: t[2].join([t[0], *(f"{k}: {v}" for k, v in t[1])]).encode("utf-8", "surrogatepass"))


# --- HTTP answers: whole exchanges over a socket ---------------------------------------------


class RawServer:
    """A TCP server on 127.0.0.1 that reads one request per connection and sends
    `answer(request)` as raw bytes, then closes (after the client did: no reset)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer: Callable[[bytes], bytes] = lambda _req: b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    req = b""
                    while b"\r\n\r\n" not in req and (chunk := conn.recv(65536)):
                        req += chunk
                    head = req.partition(b"\r\n\r\n")[0].lower()
                    length = int(head.partition(b"content-length: ")[2].split(b"\r\n")[0] or 0)
                    while len(req.partition(b"\r\n\r\n")[2]) < length and (chunk := conn.recv(65536)):
                        req += chunk
                    conn.sendall(self.answer(req))
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass  # the client gave up first (too large, malformed): its side of the test

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone would not)
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def raw_server() -> Iterator[RawServer]:
    s = RawServer()
    yield s
    s.close()


MAX_BODY = 4096


def exchange(server: RawServer, answer: bytes, method: str = "GET") -> httpio.Response | None:
    server.answer = lambda _req: answer
    try:
        resp = httpio.exchange(method, server.url + "/", budget_s=10.0, connect_timeout_s=5.0, max_body=MAX_BODY)
    except SIGNALS:
        return None
    assert 200 <= resp.status <= 999 and len(resp.body) <= MAX_BODY
    return resp


@FUZZ
@given(st.one_of(HEADS, st.binary(max_size=300)), TOKEN_EDITS, st.sampled_from([b"\r\n\r\n", b"\n\n"]))
def test_heads(raw_server: RawServer, raw: bytes, edits: list[tuple[int, int, bytes]], end: bytes) -> None:
    """Generated and mutated status lines and header blocks, then the blank line: a Retry, or an
    answer within the bounds that h11 and httpio keep."""
    resp = exchange(raw_server, mutate(raw, edits) + end)
    if resp is None:
        return
    assert len(resp.headers) <= httpio.MAX_HEADERS and all(k == k.lower() for k in resp.headers)
    assert not ("transfer-encoding" in resp.headers and "content-length" in resp.headers)
    assert resp.headers.get("content-length", "0").isdigit()


def chunk(body: bytes, cuts: list[int], ext: bool) -> bytes:
    out, at = [], 0
    for n in [*cuts, len(body)]:
        piece = body[at : at + max(n, 1)]
        at += len(piece)
        if piece:
            out.append(b"%x%s\r\n%s\r\n" % (len(piece), b";a=b" if ext else b"", piece))
        if at >= len(body):
            break
    return b"".join(out) + b"0\r\nTrailer: x\r\n\r\n"


ANSWERS = st.fixed_dictionaries(
    {
        "body": st.one_of(st.binary(max_size=64), st.binary(min_size=MAX_BODY - 32, max_size=MAX_BODY + 64)),
        "framing": st.sampled_from(["length", "chunked", "close"]),
        "encoding": st.sampled_from([None, "identity", "gzip", "x-gzip", " GZip ", "deflate"]),
        "interim": st.integers(0, 3),
        "cuts": st.lists(st.integers(0, 2000), max_size=4),
        "ext": st.booleans(),
        "status": st.sampled_from([200, 201, 404, 429, 500, 503]),
    }
)


def render_answer(a: dict[str, Any]) -> bytes:
    gzipped = a["encoding"] is not None and "gzip" in a["encoding"].lower()
    wire_body = gzip.compress(a["body"], mtime=0) if gzipped else a["body"]
    headers = [f"HTTP/1.1 {a['status']} Whatever", "Retry-After: 1"]
    if a["encoding"] is not None:
        headers.append(f"Content-Encoding: {a['encoding']}")
    if a["framing"] == "length":
        headers.append(f"Content-Length: {len(wire_body)}")
    elif a["framing"] == "chunked":
        headers.append("Transfer-Encoding: chunked")
        wire_body = chunk(wire_body, a["cuts"], a["ext"])
    interim: bytes = b"HTTP/1.1 100 Continue\r\n\r\n" * a["interim"]
    return interim + "\r\n".join(headers).encode() + b"\r\n\r\n" + wire_body


@FUZZ
@given(ANSWERS)
def test_exchange_well_formed(raw_server: RawServer, a: dict[str, Any]) -> None:
    """Differential: each framing yields the body sent, or ResponseTooLarge past the bound; a
    body with a Content-Encoding (other than identity) is a fault."""
    raw = render_answer(a)
    coded = a["encoding"] is not None and a["encoding"].strip().lower() != "identity"
    coded_body = coded and ("gzip" in a["encoding"].lower() or bool(a["body"]))  # gzip of b"" is 20 bytes
    raw_server.answer = lambda _req: raw
    try:
        resp = httpio.exchange("GET", raw_server.url + "/", budget_s=10.0, connect_timeout_s=5.0, max_body=MAX_BODY)
    except httpio.ResponseTooLarge:
        assert len(a["body"]) > MAX_BODY or len(raw) > MAX_BODY
        return
    except Retry as r:  # we ask for identity and decode nothing: a coded body is a fault
        assert coded_body, r.reason
        return
    assert not coded_body
    assert (resp.status, resp.body, resp.header("retry-after")) == (a["status"], a["body"], "1")


@FUZZ
@given(ANSWERS, TOKEN_EDITS, st.integers(0, 1 << 14), st.sampled_from(["GET", "HEAD", "POST"]))
def test_exchange_mutated_and_truncated(
    raw_server: RawServer, a: dict[str, Any], edits: list[tuple[int, int, bytes]], cut: int, method: str
) -> None:
    raw = mutate(render_answer(a), edits)
    exchange(raw_server, raw[:cut] if cut < len(raw) else raw, method)


@FUZZ
@given(st.binary(max_size=512))
def test_exchange_random_bytes(raw_server: RawServer, raw: bytes) -> None:
    exchange(raw_server, raw)


# --- the wireserver health client, end to end ------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def http_answer(status: int, body: bytes, retry_after: str) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nRetry-After: {retry_after}\r\n\r\n"
    return head.encode("utf-8", "surrogatepass") + body


@FUZZ
@given(
    st.sampled_from([201, 400, 404, 405, 410, 429, 500]),
    st.sampled_from([200, 404, 410, 429, 503]),
    st.sampled_from([200, 400, 410, 429, 500]),
    st.one_of(st.binary(max_size=200), st.builds(mutate, st.just(GOAL_STATE), EDITS), st.builds(render, XML_TREES)),
    st.text(max_size=12),
    st.sampled_from([wire.READY, wire.NOT_READY]),
)
def test_health_report_end_to_end(
    raw_server: RawServer, json_status: int, gs_status: int, xml_status: int, gs_body: bytes, ra: str, state: str
) -> None:
    """Whatever the wireserver answers, report() acknowledges or raises an AgentError: the
    retry loop's own Retry never escapes it."""

    def answer(req: bytes) -> bytes:
        if req.startswith(b"POST /provisioning/health"):
            return http_answer(json_status, b"", ra)
        if req.startswith(b"GET /machine/?comp=goalstate"):
            return http_answer(gs_status, gs_body, ra)
        return http_answer(xml_status, b"", ra)

    raw_server.answer = answer
    clock = FakeClock()
    client = health.WireserverClient(
        raw_server.url, clock=clock, sleep=clock.sleep, rand=lambda: 0.5, backoff=Backoff(1.0, 4.0, 8.0)
    )
    try:
        client.report(state, description=None if state == wire.READY else "x", deadline=Deadline(20.0, clock=clock))
    except AgentError:
        pass

"""httpio against a hostile server (tests/fakecloud/faults.py, real sockets on 127.0.0.1).

Each fault must end as a `Retry` (so the caller retries until its own deadline) or, for an
oversized answer, as `ResponseTooLarge`; nothing else may escape.  End to end, a real
`guest-agent run` whose IMDS misbehaves exits 69 by its deadline and reports NotReady, and a
misbehaving wireserver cannot hold the NotReady or Ready report past its deadline.
Tests never assert wall time: a fault the deadline did not end would hang the test (each
subprocess has a generous timeout as a safety net).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent import httpio
from guest_agent.azure import kvp
from guest_agent.transport import Retry, parse_retry_after
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.faults import FAULTS, TOO_LARGE, FaultServer
from tests.fakecloud.server import FakeServer, Script
from tests.fakecloud.wireserver import FakeWireserver


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def exchange(url: str, max_body: int = 64 * 1024, budget_s: float = 0.4) -> httpio.Response:
    """A budget that ends the faults that never finish an answer quickly; an exchange expected to
    succeed gets a long one, so a loaded machine cannot turn it into a timeout."""
    return httpio.exchange(
        "GET", url, headers={"Metadata": "true"}, budget_s=budget_s, connect_timeout_s=budget_s / 2, max_body=max_body
    )


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_every_fault_is_a_retry(faults: FaultServer, name: str) -> None:
    if name == "retry-after-unicode":  # a well-formed answer with a bad header: the status decides
        resp = exchange(f"{faults.url}/fault/{name}", budget_s=30.0)
        assert (resp.status, parse_retry_after(resp.header("retry-after"), 0.0)) == (503, None)
        return
    if name == "folded-header":  # RFC 9112 §5.2: a user agent replaces obs-fold with a space (h11 does)
        resp = exchange(f"{faults.url}/fault/{name}")
        assert (resp.status, resp.header("x-a"), resp.body) == (200, "1 folded", b"")
        return
    with pytest.raises(Retry) as ei:
        exchange(f"{faults.url}/fault/{name}")
    assert ei.value.reason


@pytest.mark.parametrize("name", sorted(TOO_LARGE))
def test_too_large_is_reported_as_such(faults: FaultServer, name: str) -> None:
    with pytest.raises(httpio.ResponseTooLarge, match="larger than the size limit"):
        exchange(f"{faults.url}/fault/{name}", max_body=1000, budget_s=30.0)


def test_a_plain_answer_still_works(faults: FaultServer) -> None:
    assert exchange(f"{faults.url}/not-a-fault", budget_s=30.0).status == 404


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("²", None),  # str.isdigit() says yes, int() says no
        ("٣", None),  # an Arabic-Indic digit
        ("-1", None),
        ("1.5", None),
        ("1e3", None),
        ("9" * 400, None),  # past int's digit limit, and past any sane delay
        ("999999999", 999999999.0),
        ("1000000000", None),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 100.0),  # IMF-fixdate
        ("Thursday, 01-Jan-70 00:01:40 GMT", 100.0),  # the obsolete RFC 850 form (RFC 9110 §5.6.7)
        ("Thu Jan  1 00:01:40 1970", 100.0),  # the obsolete asctime form: no zone, GMT
        ("Thu, 01 Jan 1970 01:01:40 +0100", 100.0),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),  # in the past: no wait
        ("Wed, 31 Dec 1969 23:59:59 GMT", 0.0),
        ("Sat, 01 Jan 2000 00:00:00 GMT", 946684800.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", None),  # past RETRY_AFTER_MAX_S: not a delay anyone means
        ("Thu, 32 Jan 1970 00:00:00 GMT", None),
        ("Mon, 31 Feb 2031 00:00:00 GMT", None),
        ("Thu, 01 Jan 1970 24:00:00 GMT", None),
        ("Thu, 01 Foo 1970 00:00:00 GMT", None),
        ("Thu, 01 Jan 1970 00:00:00 +9999", None),  # an offset of days
        ("Thu, 01 Jan 1970 00:00:00 GMT" + " " * 40 + "x", None),  # longer than any HTTP-date
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, 0.0) == expected


@pytest.mark.parametrize(
    "url",
    ["https://169.254.169.254", "http://", "http://user@host/", "http://h:0/", "http://h:99999/", "http://h:x/"],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    from guest_agent.errors import ConfigError

    with pytest.raises(ConfigError):
        httpio.split_url(url)


@pytest.mark.parametrize(
    ("url", "host", "port", "path"),
    [
        ("http://169.254.169.254", "169.254.169.254", 80, "/"),
        ("http://h:", "h", 80, "/"),
        ("http://[fd00:ec2::254]:8080/latest/api/token", "fd00:ec2::254", 8080, "/latest/api/token"),
        (
            "http://metadata/computeMetadata/v1/instance/attributes/user-data?alt=text",
            "metadata",
            80,
            "/computeMetadata/v1/instance/attributes/user-data?alt=text",
        ),
        ("http://h?x=1", "h", 80, "/?x=1"),
    ],
)
def test_split_url(url: str, host: str, port: int, path: str) -> None:
    assert httpio.split_url(url) == httpio.Target(host, port, path)


def test_header_values_with_line_breaks_are_never_sent(faults: FaultServer) -> None:
    with pytest.raises(Retry, match="refusing to send header"):
        httpio.exchange(
            "GET", faults.url + "/x", headers={"X": "a\r\nInjected: 1"}, budget_s=1, connect_timeout_s=1, max_body=10
        )
    assert "x" not in faults.hits[-1:]


# --------------------------------------------------------------------------- the agent, end to end


def _agent(root: Path, conf_text: str) -> subprocess.Popen[str]:
    caa.make_root(str(root), caa.AZURE_DMI)
    conf = root.parent / (root.name + ".toml")
    conf.write_text(conf_text + "[netns]\nenabled = false\n[tpm]\nenabled = false\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    argv = [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(conf)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_misbehaving_imds_ends_by_the_deadline_with_69_and_not_ready(faults: FaultServer, tmp_path: Path) -> None:
    """Every fault as the Azure IMDS, one agent each, all at once: exit 69, NotReady reported."""
    names = sorted(FAULTS)
    servers = {n: FakeWireserver().start() for n in names}
    try:
        procs = {
            n: _agent(
                tmp_path / n,
                f'[azure]\nimds_url = "{faults.url}"\nuser_data_path = "/fault/{n}"\n'
                f'wireserver_url = "{servers[n].url}"\nfailure_deadline_s = 10.0\n'
                "[fetch]\ndeadline_s = 1.0\nconnect_timeout_s = 0.2\nread_timeout_s = 0.3\n",
            )
            for n in names
        }
        outs = {n: p.communicate(timeout=120)[0] for n, p in procs.items()}
        for n, p in procs.items():
            assert p.returncode == 69, (n, outs[n][-1500:])
            assert "fetching user-data (azure) failed until the deadline" in outs[n], n
            (rep,) = servers[n].accepted()
            assert rep.state == "NotReady", n
            report = kvp.parse_provisioning_report(rep.description or "")
            assert report["reason"] == "fetching user-data (azure) failed until the deadline", n
            assert not (tmp_path / n / "run/peerpod").exists()
    finally:
        for s in servers.values():
            s.stop()


@pytest.mark.parametrize("fault", ["drip-headers", "endless-continue", "drip-chunked"])
def test_a_misbehaving_wireserver_cannot_hold_the_reports(faults: FaultServer, tmp_path: Path, fault: str) -> None:
    """NotReady (user-data invalid: 78) and Ready (provisioned: 0) against a wireserver that never
    finishes an answer: each run ends by its report's deadline with the provisioning's own code."""
    bad_ud = FakeServer("imds", imds.azure(b"%% not base64", Script())).start()
    good_ud = FakeServer("imds", imds.azure(caa.cloud_config(), Script())).start()
    try:
        ws = f"{faults.url}/fault/{fault}"
        common = "wireserver_connect_timeout_s = 0.2\nwireserver_read_timeout_s = 0.3\n"
        failing = _agent(
            tmp_path / "failing",
            f'[azure]\nimds_url = "{bad_ud.url}"\nwireserver_url = "{ws}"\nfailure_deadline_s = 1.0\n{common}',
        )
        ok = _agent(
            tmp_path / "ok",
            f'[azure]\nimds_url = "{good_ud.url}"\nwireserver_url = "{ws}"\nready_deadline_s = 1.0\n{common}',
        )
        out_failing, out_ok = failing.communicate(timeout=120)[0], ok.communicate(timeout=120)[0]
    finally:
        bad_ud.stop()
        good_ud.stop()
    assert failing.returncode == 78, out_failing[-1500:]
    assert "could not report the provisioning failure" in out_failing
    assert (tmp_path / "failing/run/guest-agent/azure-not-ready").exists()
    # Exit status reflects provisioning only: the files are there, READY=1 was sent.
    assert ok.returncode == 0, out_ok[-1500:]
    assert "Ready was not acknowledged" in out_ok
    assert (tmp_path / "ok/run/peerpod/apf.json").exists()


def answered(method: str, answer: bytes, heads: list[bytes] | None = None) -> tuple[int, bytes] | str:
    """(status, body) of one exchange with a server that sends `answer` and closes, or the Retry's
    reason; the request's head is appended to `heads` if given."""
    import socket
    import threading

    with socket.create_server(("127.0.0.1", 0)) as srv:

        def serve() -> None:
            conn, _ = srv.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                    head += chunk
                if heads is not None:
                    heads.append(head)
                conn.sendall(answer)

        threading.Thread(target=serve, daemon=True).start()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/"
        try:
            resp = httpio.exchange(method, url, budget_s=5, connect_timeout_s=1, max_body=4096)
        except Retry as r:
            return r.reason
        return (resp.status, resp.body)


def test_the_request_asks_for_identity_and_one_exchange_per_connection() -> None:
    """No compressed answer to decode (RFC 9110 §12.5.3) and no connection to reuse."""
    heads: list[bytes] = []
    assert answered("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", heads) == (200, b"ok")
    lines = heads[0].split(b"\r\n")
    assert lines[0] == b"GET / HTTP/1.1"
    assert {b"accept-encoding: identity", b"connection: close"} <= {ln.lower() for ln in lines}


def test_a_content_length_of_thousands_of_digits() -> None:
    """Regression: past CPython's 4300-digit int() limit, h11 0.14 let a ValueError out of its
    parser (0.16 refuses more than 20 digits), and httpio's own int() did so for a HEAD answer."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n"
    reason = answered("GET", answer)
    assert isinstance(reason, str) and reason.startswith("malformed answer")
    assert answered("HEAD", answer) in ((200, b""), "malformed answer (bad Content-Length)")  # 0.14, 0.16


def test_well_formed_chunked_and_read_to_close_answers_and_a_compressed_one() -> None:
    """Hand-written good cases (the generated ones: tests/test_fuzz_http.py): parsed exactly.  A
    gzip body is refused as a fault: we ask for identity (Accept-Encoding) and decode nothing."""
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nT: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\nContent-Encoding: gzip\r\n\r\n"
        + bytes.fromhex("1f8b0800000000000203cb48cdc9c95728cf2fca49e102002d3b08af0c000000"),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Slow down\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.0 200 OK\r\n\r\nread to the end",
        b"HTTP/1.1 204 No Content\r\nContent-Encoding: gzip\r\n\r\n",  # no body to decode: answered
    ]
    got = [answered("GET", answer) for answer in answers]
    assert got == [
        (200, b"hello world"),
        "unsupported Content-Encoding (gzip)",
        (429, b"no"),
        (200, b"read to the end"),
        (204, b""),
    ]


def test_a_non_ascii_host_is_a_config_error() -> None:
    from guest_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="ASCII host"):
        httpio.exchange("GET", "http://a..é/", budget_s=1, connect_timeout_s=1, max_body=10)

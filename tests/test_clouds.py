"""User-data fetchers of every cloud against real HTTP servers on 127.0.0.1.

Every test drives `boot.fetch_user_data` (the retry loop, the deadline and the provider
module together) with a fake clock: `sleep` records the delay and moves the clock by it,
so backoff and Retry-After values are asserted exactly and "deadline reached" happens
without waiting.  Only per-request socket timeouts (0.3 s) use wall time.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent import boot
from guest_agent.clouds import http
from guest_agent.config import Config
from guest_agent.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, MetadataUnavailable, UserDataInvalid
from guest_agent.transport import Retry
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Handler, Reply, Request, Script
from tests.fakecloud.wireserver import FakeWireserver

USER_DATA = caa.cloud_config()
CLOUDS = ("azure", "aws", "gcp", "alibaba", "ibmcloud", "openstack")
DATA_PATH = {
    "azure": "/metadata/instance/compute/userData",
    "aws": "/latest/user-data",
    "gcp": "/computeMetadata/v1/instance/attributes/user-data",
    "alibaba": "/latest/user-data",
    "ibmcloud": "/metadata/v1/instance/initialization",
    "openstack": "/openstack/latest/user_data",
}
TOKEN_PATH = {"aws": "/latest/api/token", "alibaba": "/latest/api/token", "ibmcloud": "/instance_identity/v1/token"}
TOKEN_HEADER = {"aws": "x-aws-ec2-metadata-token", "alibaba": "x-aliyun-ecs-metadata-token"}
TTL_HEADER = {"aws": "x-aws-ec2-metadata-token-ttl-seconds", "alibaba": "x-aliyun-ecs-metadata-token-ttl-seconds"}
FACTORY: dict[str, Callable[..., Handler]] = {**imds.FACTORIES}  # their keyword options differ
FIRST_BACKOFF = Config().fetch.backoff_initial_s  # 0.1 s before the first retry


class FakeTime:
    """A monotonic clock that moves only when the code under test sleeps; nothing really sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def deps(self) -> boot.Deps:
        """The agent's clock and sleep on this fake time, jitter at its cap: delays are exact."""
        return boot.Deps(clock=self.clock, sleep=self.sleep, rand=lambda: 1.0)


def make_cfg(cloud: str, url: str, *, deadline_s: float = 3.0, timeout_s: float = 0.3) -> Config:
    c = Config()
    fetch = dataclasses.replace(c.fetch, deadline_s=deadline_s, connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
    section: Any = {
        "azure": dataclasses.replace(c.azure, imds_url=url),
        "aws": dataclasses.replace(c.aws, imds_url=url),
        "gcp": dataclasses.replace(c.gcp, metadata_url=url),
        "alibaba": dataclasses.replace(c.alibaba, metadata_url=url),
        "ibmcloud": dataclasses.replace(c.ibmcloud, metadata_url=url),
        "openstack": dataclasses.replace(c.openstack, metadata_url=url),
    }[cloud]
    return dataclasses.replace(c, provider=cloud, fetch=fetch, **{cloud: section})


def fetch(cloud: str, url: str, root: Path, ft: FakeTime, **kw: float) -> bytes:
    return boot.fetch_user_data(cloud, make_cfg(cloud, url, **kw), str(root), ft.deps())


def closed_port_url() -> str:
    """A 127.0.0.1 port nobody listens on: bound, then closed (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def running() -> Iterator[list[FakeServer]]:
    """Servers are stopped together at the end of the module: each `stop()` waits up to
    0.5 s for `serve_forever`'s poll, which would otherwise dominate the run time."""
    started: list[FakeServer] = []
    yield started
    stoppers = [threading.Thread(target=s.stop) for s in started]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()


@pytest.fixture
def serve(running: list[FakeServer]) -> Callable[[Handler], FakeServer]:
    def start(handler: Handler) -> FakeServer:
        server = FakeServer("imds", handler).start()
        running.append(server)
        return server

    return start


@pytest.fixture
def wireserver(running: list[FakeServer]) -> FakeWireserver:
    ws = FakeWireserver().start()
    running.append(ws.server)
    return ws


@pytest.fixture
def ft() -> FakeTime:
    return FakeTime()


def data_requests(server: FakeServer, cloud: str) -> list[Request]:
    return [r for r in server.requests if r.path == DATA_PATH[cloud]]


def token_requests(server: FakeServer, cloud: str) -> list[Request]:
    return [r for r in server.requests if r.path == TOKEN_PATH.get(cloud)]


def expire_after_first_token(inner: Handler, book: imds.TokenBook) -> Handler:
    """The first token issued is dead before it is used: the next GET with it gets 401."""
    issued: list[Request] = []

    def handle(req: Request) -> Reply:
        reply = inner(req)
        if req.method == "PUT" and reply.status == 200 and not issued:
            issued.append(req)
            book.expire_all()
        return reply

    return handle


# -- the exact requests each cloud needs


def test_azure_request_shape(serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path) -> None:
    server = serve(imds.azure(USER_DATA, Script()))
    assert fetch("azure", server.url, tmp_path, ft) == USER_DATA  # the base64 text, decoded
    [req] = server.requests
    assert (req.method, req.path) == ("GET", "/metadata/instance/compute/userData")
    assert req.query == {"api-version": ["2021-01-01"], "format": ["text"]}
    assert req.header("Metadata") == "true"
    assert req.header("X-Forwarded-For") is None
    assert ft.sleeps == []


@pytest.mark.parametrize("cloud", ["aws", "alibaba"])
def test_token_clouds_request_shape(
    cloud: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    book = imds.TokenBook()
    server = serve(FACTORY[cloud](USER_DATA, Script(), tokens=book))
    assert fetch(cloud, server.url, tmp_path, ft) == USER_DATA  # raw bytes, not base64
    put, get = server.requests
    assert (put.method, put.path) == ("PUT", "/latest/api/token")
    assert put.header(TTL_HEADER[cloud]) == "21600"
    assert (get.method, get.path) == ("GET", "/latest/user-data")
    assert get.header(TOKEN_HEADER[cloud]) in book.valid
    assert get.header("X-Forwarded-For") is None and put.header("X-Forwarded-For") is None
    assert ft.sleeps == []


def test_gcp_request_shape(serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path) -> None:
    server = serve(imds.gcp(USER_DATA, Script()))
    assert fetch("gcp", server.url, tmp_path, ft) == USER_DATA
    [req] = server.requests
    assert (req.method, req.path, req.query) == ("GET", DATA_PATH["gcp"], {})
    assert req.header("Metadata-Flavor") == "Google"
    assert req.header("X-Forwarded-For") is None


def test_gcp_answer_without_metadata_flavor_is_not_the_metadata_server(
    serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    body = base64.b64encode(USER_DATA)
    server = serve(lambda req: Reply(200, body))  # anything else on that address
    with pytest.raises(MetadataUnavailable) as ei:
        fetch("gcp", server.url, tmp_path, ft, deadline_s=1.0)
    assert "Metadata-Flavor" in ei.value.supporting_data["last_error"]
    assert len(server.requests) == ei.value.supporting_data["attempts"] > 1


def test_ibmcloud_request_shape(serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path) -> None:
    book = imds.TokenBook()
    server = serve(imds.ibmcloud(USER_DATA, Script(), tokens=book))
    assert fetch("ibmcloud", server.url, tmp_path, ft) == USER_DATA
    put, get = server.requests
    assert (put.method, put.path, put.query) == ("PUT", "/instance_identity/v1/token", {"version": ["2022-03-01"]})
    assert put.header("Metadata-Flavor") == "ibm"
    assert put.header("Content-Type") == "application/json"
    assert json.loads(put.body) == {"expires_in": 300}
    assert (get.method, get.path, get.query) == ("GET", DATA_PATH["ibmcloud"], {"version": ["2022-03-01"]})
    auth = get.header("Authorization") or ""
    assert auth.startswith("Bearer ") and auth[7:] in book.valid
    assert get.header("Accept") == "application/json"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_no_proxy_even_when_the_environment_sets_one(
    cloud: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error
    import urllib.request

    proxy = closed_port_url()  # a proxy that refuses every connection, on loopback
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, proxy)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    server = serve(FACTORY[cloud](USER_DATA, Script()))
    # Control: the stdlib's default opener honours the variable, so this environment really points at the proxy.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url + "/", timeout=2)
    assert server.requests == []
    assert fetch(cloud, server.url, tmp_path, ft) == USER_DATA
    assert data_requests(server, cloud)


# -- "not yet" answers are retried, with the backoff or the server's Retry-After

RETRIED: dict[str, tuple[Callable[[], Reply], float]] = {
    "404": (lambda: Reply(404, "Not Found"), FIRST_BACKOFF),
    "410": (lambda: Reply(410, "Gone"), FIRST_BACKOFF),
    # Retry-After, then jitter (here at its maximum) spanning min(Retry-After, backoff_max_s)
    "429-retry-after-2": (lambda: Reply(429, "Too Many Requests", {"Retry-After": "2"}), 2.0 + 2.0),
    "429-no-retry-after": (lambda: Reply(429, "Too Many Requests"), FIRST_BACKOFF),
    "500": (lambda: Reply(500, "Internal Server Error"), FIRST_BACKOFF),
    "503": (lambda: Reply(503, "Service Unavailable"), FIRST_BACKOFF),
    "empty-body": (lambda: Reply(200, ""), FIRST_BACKOFF),
    # past the 0.3 s read timeout; the server thread finishes on its own later
    "slow": (lambda: Reply(200, "late", delay_s=1.5), FIRST_BACKOFF),
}


@pytest.mark.parametrize(
    ("cloud", "case"),
    # OpenStack: a 404 is "no user-data" once meta_data.json answers (test_openstack.py)
    [(cloud, case) for cloud in CLOUDS for case in sorted(RETRIED) if (cloud, case) != ("openstack", "404")],
)
def test_retried_then_200(
    cloud: str, case: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    make_reply, delay = RETRIED[case]
    server = serve(FACTORY[cloud](USER_DATA, Script({"user-data": [make_reply()]})))
    assert fetch(cloud, server.url, tmp_path, ft, deadline_s=5.0) == USER_DATA
    assert ft.sleeps == [delay]
    assert len(data_requests(server, cloud)) == 2
    if cloud in TOKEN_PATH:
        assert len(token_requests(server, cloud)) == 1  # the token is kept across attempts


def test_retry_after_is_capped(serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path) -> None:
    script = Script({"user-data": [Reply(429, "", {"Retry-After": "3600"})]})
    server = serve(imds.azure(USER_DATA, script))
    assert fetch("azure", server.url, tmp_path, ft, deadline_s=100.0) == USER_DATA
    fc = Config().fetch
    assert ft.sleeps == [fc.retry_after_max_s + fc.backoff_max_s]  # capped, then the jitter (here at its maximum)


def test_retry_after_past_the_deadline_gives_up_at_once(
    serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    server = serve(imds.azure(USER_DATA, Script({"user-data": [Reply(503, "", {"Retry-After": "3"})]})))
    with pytest.raises(MetadataUnavailable) as ei:
        fetch("azure", server.url, tmp_path, ft, deadline_s=2.0)
    assert ft.sleeps == []  # waiting 3 s cannot help within 2 s
    assert len(server.requests) == 1
    assert "503" in ei.value.supporting_data["last_error"]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_connection_refused_until_the_deadline(cloud: str, ft: FakeTime, tmp_path: Path) -> None:
    with pytest.raises(MetadataUnavailable) as ei:
        fetch(cloud, closed_port_url(), tmp_path, ft, deadline_s=2.0)
    err = ei.value
    assert err.exit_code == EXIT_UNAVAILABLE == 69
    assert err.reason == f"fetching user-data ({cloud}) failed until the deadline"
    assert "connection failed" in err.supporting_data["last_error"]
    assert "refused" in err.supporting_data["last_error"].lower()
    assert err.supporting_data["deadline_s"] == 2.0
    # 0.1 + 0.2 + 0.4 + 0.8 = 1.5 s slept; the next delay (1.6 s) does not fit in the 0.5 s left.
    assert ft.sleeps == [0.1, 0.2, 0.4, 0.8]
    assert err.supporting_data["attempts"] == 5


# -- what does not get better is not retried


@pytest.mark.parametrize("cloud", ["azure", "gcp"])
def test_invalid_base64_fails_at_once(
    cloud: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    server = serve(FACTORY[cloud](USER_DATA, Script({"user-data": [Reply(200, "#cloud-config: not base64!")]})))
    with pytest.raises(UserDataInvalid) as ei:
        fetch(cloud, server.url, tmp_path, ft)
    assert ei.value.exit_code == EXIT_CONFIG == 78
    assert "not valid base64" in ei.value.reason
    assert len(server.requests) == 1
    assert ft.sleeps == []


FAIL_FAST = [
    (cloud, status)
    for cloud, statuses in {
        "azure": (400, 401, 403),
        "gcp": (400, 401, 403),
        # with a session token, 401 means "expired" and is retried (tested below)
        "aws": (400, 403),
        "alibaba": (400, 403),
        "ibmcloud": (400, 403),
        "openstack": (400, 401, 403),
    }.items()
    for status in statuses
]


@pytest.mark.parametrize(("cloud", "status"), FAIL_FAST)
def test_refused_fails_fast(
    cloud: str, status: int, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    server = serve(FACTORY[cloud](USER_DATA, Script({"user-data": [Reply(status, "refused")]})))
    with pytest.raises(MetadataUnavailable) as ei:
        fetch(cloud, server.url, tmp_path, ft)
    assert ei.value.exit_code == EXIT_UNAVAILABLE
    assert "refused" in ei.value.reason
    assert ei.value.supporting_data["status"] == status
    assert len(data_requests(server, cloud)) == 1
    assert ft.sleeps == []


# -- AWS IMDSv2 and Alibaba hardened mode: token, fallback, expiry


@pytest.mark.parametrize(("cloud", "token_status"), [("aws", 403), ("aws", 405), ("alibaba", 404), ("alibaba", 403)])
def test_token_refused_falls_back_to_tokenless_get(
    cloud: str, token_status: int, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    # aws: IMDSv1 allowed (imdsv1=True); alibaba: normal mode (no token required)
    server = serve(FACTORY[cloud](USER_DATA, Script({"token": [Reply(token_status, "no")]})))
    assert fetch(cloud, server.url, tmp_path, ft) == USER_DATA
    put, get = server.requests
    assert (put.method, put.path, get.method, get.path) == ("PUT", "/latest/api/token", "GET", "/latest/user-data")
    assert get.header(TOKEN_HEADER[cloud]) is None
    assert ft.sleeps == []


@pytest.mark.parametrize("token", [b"\xff\xfetoken", b"tok\nen", b"tok en"], ids=["not-ascii", "newline", "space"])
@pytest.mark.parametrize("cloud", ["aws", "alibaba"])
def test_unusable_token_is_a_token_failure(
    cloud: str, token: bytes, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    # A token that cannot be sent back as a header value (requests would raise on it) is
    # treated like a refused token: tokenless fallback, not an internal error.
    server = serve(FACTORY[cloud](USER_DATA, Script({"token": [Reply(200, token)]})))
    assert fetch(cloud, server.url, tmp_path, ft) == USER_DATA
    assert server.requests[1].header(TOKEN_HEADER[cloud]) is None


@pytest.mark.parametrize("cloud", ["aws", "alibaba"])
def test_token_required_and_refused_fails_fast(
    cloud: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    strict = {"imdsv1": False} if cloud == "aws" else {"normal_mode": False}
    server = serve(FACTORY[cloud](USER_DATA, Script({"token": [Reply(403, "Forbidden")]}), **strict))
    with pytest.raises(MetadataUnavailable) as ei:
        fetch(cloud, server.url, tmp_path, ft)
    assert "requires one" in ei.value.reason
    assert ei.value.supporting_data["token_status"] == 403
    assert [r.method for r in server.requests] == ["PUT", "GET"]
    assert ft.sleeps == []


@pytest.mark.parametrize("cloud", ["aws", "alibaba"])
def test_token_endpoint_5xx_is_retried_when_tokens_are_required(
    cloud: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    strict = {"imdsv1": False} if cloud == "aws" else {"normal_mode": False}
    book = imds.TokenBook()
    script = Script({"token": [Reply(500, "oops")]})
    server = serve(FACTORY[cloud](USER_DATA, script, tokens=book, **strict))
    assert fetch(cloud, server.url, tmp_path, ft) == USER_DATA
    assert [(r.method, r.path) for r in server.requests] == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/user-data"),  # tokenless: refused
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/user-data"),
    ]
    assert server.requests[1].header(TOKEN_HEADER[cloud]) is None
    assert server.requests[3].header(TOKEN_HEADER[cloud]) in book.valid
    assert ft.sleeps == [FIRST_BACKOFF]


@pytest.mark.parametrize("how", ["token-book", "scripted-401"])
@pytest.mark.parametrize("cloud", ["aws", "alibaba"])
def test_expired_token_is_replaced(
    cloud: str, how: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    book = imds.TokenBook()
    if how == "token-book":
        handler = expire_after_first_token(FACTORY[cloud](USER_DATA, Script(), tokens=book), book)
    else:
        handler = FACTORY[cloud](USER_DATA, Script({"user-data": [Reply(401, "expired")]}), tokens=book)
    server = serve(handler)
    assert fetch(cloud, server.url, tmp_path, ft) == USER_DATA
    assert [r.method for r in server.requests] == ["PUT", "GET", "PUT", "GET"]
    first, second = server.requests[1].header(TOKEN_HEADER[cloud]), server.requests[3].header(TOKEN_HEADER[cloud])
    assert first and second and first != second
    assert second in book.valid
    assert ft.sleeps == [FIRST_BACKOFF]


# -- IBM Cloud: identity token


@pytest.mark.parametrize("how", ["token-book", "scripted-401"])
def test_ibmcloud_401_refreshes_the_token(
    how: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    book = imds.TokenBook()
    if how == "token-book":
        handler = expire_after_first_token(imds.ibmcloud(USER_DATA, Script(), tokens=book), book)
    else:
        handler = imds.ibmcloud(USER_DATA, Script({"user-data": [Reply(401, "expired")]}), tokens=book)
    server = serve(handler)
    assert fetch("ibmcloud", server.url, tmp_path, ft) == USER_DATA
    assert [r.method for r in server.requests] == ["PUT", "GET", "PUT", "GET"]
    tokens = [r.header("Authorization") for r in server.requests if r.method == "GET"]
    assert tokens[0] != tokens[1]
    assert ft.sleeps == [FIRST_BACKOFF]


@pytest.mark.parametrize("status", [400, 401, 403])
def test_ibmcloud_token_refused_fails_fast(
    status: int, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    server = serve(imds.ibmcloud(USER_DATA, Script({"token": [Reply(status, "{}")]})))
    with pytest.raises(MetadataUnavailable) as ei:
        fetch("ibmcloud", server.url, tmp_path, ft)
    assert ei.value.supporting_data["status"] == status
    assert len(server.requests) == 1
    assert ft.sleeps == []


@pytest.mark.parametrize(
    "reply",
    [
        Reply(500, "oops"),
        Reply(200, "not json"),
        Reply(200, '{"expires_in": 300}'),
        Reply(200, json.dumps({"access_token": "tok\nen"})),
        Reply(200, json.dumps({"access_token": "t\u20ac"})),
    ],
    ids=["500", "not-json", "no-access-token", "token-with-newline", "token-not-ascii"],
)
def test_ibmcloud_token_not_yet_is_retried(
    reply: Reply, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    server = serve(imds.ibmcloud(USER_DATA, Script({"token": [reply]})))
    assert fetch("ibmcloud", server.url, tmp_path, ft) == USER_DATA
    assert [r.method for r in server.requests] == ["PUT", "PUT", "GET"]
    assert ft.sleeps == [FIRST_BACKOFF]


def test_ibmcloud_initialization_without_user_data_is_retried(
    serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    server = serve(imds.ibmcloud(None, Script()))
    with pytest.raises(MetadataUnavailable) as ei:
        fetch("ibmcloud", server.url, tmp_path, ft, deadline_s=1.0)
    assert "no user_data" in ei.value.supporting_data["last_error"]
    assert len(token_requests(server, "ibmcloud")) == 1


# -- the whole agent, as systemd runs it

DMI = {
    "azure": caa.AZURE_DMI,
    "aws": {"sys_vendor": "Amazon EC2", "product_name": "m6i.large", "bios_vendor": "Amazon EC2"},
    "gcp": {"sys_vendor": "Google", "product_name": "Google Compute Engine", "board_vendor": "Google"},
    "alibaba": {"sys_vendor": "Alibaba Cloud", "product_name": "Alibaba Cloud ECS"},
    "ibmcloud": {"sys_vendor": "QEMU", "chassis_vendor": "IBM:Cloud Compute Server 1.0:Nitro"},
    "openstack": {"sys_vendor": "OpenStack Foundation", "product_name": "OpenStack Nova"},
}
URL_KEY = {"azure": "imds_url", "aws": "imds_url"}
INITDATA = caa.initdata_toml()


def run_agent(
    cloud: str,
    root: Path,
    url: str,
    *,
    deadline_s: float = 10.0,
    wireserver: str | None = None,
    provider: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`guest-agent run --root ROOT --config CFG` as systemd would run it (minus the notify socket)
    on `cloud`'s DMI; the provider detected from it unless `provider` is given."""
    caa.make_root(str(root), DMI[cloud])
    lines = [f'provider = "{provider}"'] if provider else []
    lines += [
        "[fetch]",
        f"deadline_s = {deadline_s}",
        "[netns]",
        "enabled = false",
        "[tpm]",
        "enabled = false",
        f"[{cloud}]",
        f'{URL_KEY.get(cloud, "metadata_url")} = "{url}"',
    ]
    if cloud == "azure":
        lines += [f'wireserver_url = "{wireserver}"'] if wireserver else ["report_ready = false"]
    cfg = root / "agent.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return run_cli(root, cfg)


def run_cli(root: Path, cfg: Path) -> subprocess.CompletedProcess[str]:
    """`guest-agent run --root ROOT --config CFG`, its stderr printed (shown by pytest on failure)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    proc = subprocess.run(
        [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(cfg)],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(proc.stderr)  # shown by pytest on failure
    return proc


def peerpod_files(root: Path) -> dict[str, bytes]:
    d = root / "run/peerpod"
    # the visible names (the agent's ..data/..gen-* machinery aside; files.py)
    names = [p for p in d.iterdir() if not p.name.startswith("..")] if d.is_dir() else []
    return {f"/run/peerpod/{p.name}": p.read_bytes() for p in names}


@pytest.mark.parametrize("cloud", CLOUDS)
def test_cli_run_writes_the_files(
    cloud: str, serve: Callable[[Handler], FakeServer], wireserver: FakeWireserver, tmp_path: Path
) -> None:
    server = serve(FACTORY[cloud](caa.cloud_config(initdata=INITDATA), Script()))
    proc = run_agent(cloud, tmp_path, server.url, wireserver=wireserver.url if cloud == "azure" else None)
    reports = wireserver.accepted()
    assert proc.returncode == 0
    files = peerpod_files(tmp_path)
    expected = caa.expected_files(initdata=INITDATA)
    # caa.encode_initdata gzips with the current time in the header, so the two encodings of
    # INITDATA may differ in their mtime field: compare what they decode to.
    got_initdata = files.get("/run/peerpod/initdata") or b""
    assert gzip.decompress(base64.b64decode(got_initdata)) == INITDATA
    assert got_initdata.endswith(b"==\n") and got_initdata.count(b"\n") == 1
    files["/run/peerpod/initdata"] = expected["/run/peerpod/initdata"]
    assert {k: files.get(k) for k in expected} == expected
    # what initdata itself carries, and its digest, are written beside them
    assert {k: v for k, v in files.items() if k not in expected} == {
        "/run/peerpod/aa.toml": caa.AA_TOML.encode(),
        "/run/peerpod/cdh.toml": caa.CDH_TOML.encode(),
        "/run/peerpod/policy.rego": caa.POLICY_REGO.encode(),
        "/run/peerpod/initdata.digest": caa.digest(INITDATA).encode(),
    }
    assert data_requests(server, cloud)
    if cloud == "azure":
        assert [r.state for r in reports] == ["Ready"]
    else:
        assert reports == []


def test_cli_run_unreachable_exits_69(tmp_path: Path) -> None:
    proc = run_agent("aws", tmp_path, closed_port_url(), deadline_s=1.0)
    assert proc.returncode == 69
    assert "provisioning failed: fetching user-data (aws) failed until the deadline" in proc.stderr
    assert "Connection refused" in proc.stderr
    assert peerpod_files(tmp_path) == {}


def test_cli_run_invalid_user_data_exits_78(
    serve: Callable[[Handler], FakeServer], wireserver: FakeWireserver, tmp_path: Path
) -> None:
    server = serve(imds.azure(USER_DATA, Script({"user-data": [Reply(200, "%%% not base64 %%%")]})))
    proc = run_agent("azure", tmp_path, server.url, wireserver=wireserver.url)
    reports = wireserver.accepted()
    assert proc.returncode == 78
    assert "provisioning failed: Azure userData is not valid base64" in proc.stderr
    assert peerpod_files(tmp_path) == {}
    assert len(server.requests) == 1
    assert [r.state for r in reports] == ["NotReady"]


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"access_token": ' + b"[" * 50 + b"]" * 50 + b"}", b"\xff\xfe", b'"x"'],
)
def test_hostile_ibm_json_is_a_retry(body: bytes) -> None:
    from guest_agent.clouds import ibmcloud
    from guest_agent.transport import Retry

    for parse in (ibmcloud.parse_token, ibmcloud.parse_initialization):
        with pytest.raises(Retry):
            parse(body)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_an_oversized_answer_is_refused_as_too_large(
    cloud: str, serve: Callable[[Handler], FakeServer], ft: FakeTime, tmp_path: Path
) -> None:
    """Not truncated into a misleading "not valid base64": refused as too large, exit 78, no retry."""
    huge = Reply(200, "QUFB" * (Config().limits.max_user_data_bytes // 2 + 1))  # past 2x the limit
    server = serve(FACTORY[cloud](USER_DATA, Script({"user-data": [huge]})))
    with pytest.raises(UserDataInvalid, match="larger than the size limit") as ei:
        fetch(cloud, server.url, tmp_path, ft)
    assert ei.value.exit_code == EXIT_CONFIG
    assert ft.sleeps == []


# --------------------------------------------------------------------------- metadata JSON depth


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b'{"a": [1, {"b": "[[["}]}', 3),
        (b'["\\"]]]", "\\\\", [[]]]', 3),  # escaped quotes and backslashes stay inside their strings
        (b'[[["x', 3),  # an unterminated string hides nothing json.loads would parse
        (b'"\\', 0),
        (b"[] [[]] {}", 2),
    ],
)
def test_json_depth(body: bytes, depth: int) -> None:
    assert http.json_depth(body) == depth


def test_json_depth_of_escaped_quotes_is_linear() -> None:
    """Regression: the string pattern failed at each quote of an unterminated string of escaped
    quotes and was tried again at the next one, so this answer cost time quadratic in its size
    (80 KB: 19 s of CPU; a 512 KiB metadata answer would have been about 15 minutes)."""
    body = b'[ "' + b'\\"' * (256 * 1024)
    assert http.json_depth(body) == 1
    with pytest.raises(Retry, match="not JSON"):
        http.parse_json(body, "x")
    with pytest.raises(Retry, match="nested deeper"):
        http.parse_json(b"[" * 33 + body, "x")

"""Fake metadata services for each cloud, enforcing the headers the real ones require.

Each factory returns a handler for `FakeServer`.  Route names for scripting:
``user-data`` (every cloud), ``token`` (aws, alibaba, ibmcloud) and ``meta-data`` (openstack).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading

from tests.fakecloud.server import Handler, Reply, Request, Script

NOT_FOUND = Reply(404, "Not Found")


class TokenBook:
    """Issued tokens; `expire_all()` makes every issued token answer 401 (expiry)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.valid: set[str] = set()

    def issue(self) -> str:
        tok = secrets.token_urlsafe(24)
        with self._lock:
            self.valid.add(tok)
        return tok

    def ok(self, tok: str | None) -> bool:
        with self._lock:
            return tok is not None and tok in self.valid

    def expire_all(self) -> None:
        with self._lock:
            self.valid.clear()


def azure(user_data: bytes | None, script: Script) -> Handler:
    """Azure IMDS: `compute/userData` returns the base64 text; `Metadata: true` is mandatory."""

    def handle(req: Request) -> Reply:
        # IMDS rejects requests without `Metadata: true` and any with X-Forwarded-For.
        if (req.header("metadata") or "").lower() != "true" or req.header("x-forwarded-for") is not None:
            return Reply(400, json.dumps({"error": "Bad request. Required metadata header not specified"}))
        if req.method != "GET" or req.path != "/metadata/instance/compute/userData":
            return NOT_FOUND
        if req.query.get("api-version") != ["2021-01-01"] or req.query.get("format") != ["text"]:
            return Reply(400, json.dumps({"error": "Bad request: api-version or format"}))
        scripted = script.take("user-data")
        if scripted:
            return scripted
        body = base64.b64encode(user_data).decode() if user_data is not None else ""
        return Reply(200, body, {"Content-Type": "text/plain; charset=utf-8"})

    return handle


def _token_service(
    user_data: bytes | None,
    script: Script,
    *,
    ttl_header: str,
    token_header: str,
    tokenless_status: int | None,
    tokens: TokenBook | None,
) -> Handler:
    """PUT /latest/api/token then GET /latest/user-data with the token header (EC2 IMDSv2,
    Alibaba hardened mode).  `tokenless_status`: what a GET without a token gets
    (None: served, i.e. IMDSv1 / Alibaba normal mode allowed)."""
    book = tokens or TokenBook()

    def handle(req: Request) -> Reply:
        if req.path == "/latest/api/token":
            if req.method != "PUT":
                return Reply(405, "")
            scripted = script.take("token")
            if scripted:
                return scripted
            if req.header("x-forwarded-for") is not None:
                return Reply(403, "Forbidden")
            ttl = req.header(ttl_header)
            if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return Reply(400, "Bad Request")
            return Reply(200, book.issue(), {ttl_header: ttl})
        if req.path == "/latest/user-data" and req.method == "GET":
            tok = req.header(token_header)
            if tok is not None and not book.ok(tok):
                return Reply(401, "Unauthorized")  # expired or invalid token
            if tok is None and tokenless_status is not None:
                return Reply(tokenless_status, "Unauthorized" if tokenless_status == 401 else "Forbidden")
            scripted = script.take("user-data")
            if scripted:
                return scripted
            return Reply(200, user_data) if user_data is not None else NOT_FOUND
        return NOT_FOUND

    return handle


def aws(user_data: bytes | None, script: Script, *, imdsv1: bool = True, tokens: TokenBook | None = None) -> Handler:
    """EC2 IMDS: IMDSv2 token PUT, then GET with the token; IMDSv1 only if `imdsv1`
    (HttpTokens=required answers a tokenless GET with 401)."""
    return _token_service(
        user_data,
        script,
        ttl_header="x-aws-ec2-metadata-token-ttl-seconds",
        token_header="x-aws-ec2-metadata-token",
        tokenless_status=None if imdsv1 else 401,
        tokens=tokens,
    )


def alibaba(
    user_data: bytes | None, script: Script, *, normal_mode: bool = True, tokens: TokenBook | None = None
) -> Handler:
    """Alibaba ECS: hardened-mode token PUT, then GET; normal mode also answers without a token
    (hardened-only mode answers a tokenless GET with 403)."""
    return _token_service(
        user_data,
        script,
        ttl_header="x-aliyun-ecs-metadata-token-ttl-seconds",
        token_header="x-aliyun-ecs-metadata-token",
        tokenless_status=None if normal_mode else 403,
        tokens=tokens,
    )


def gcp(user_data: bytes | None, script: Script) -> Handler:
    """GCE metadata server by IP; `Metadata-Flavor: Google` both ways.  CAA stores base64."""

    def handle(req: Request) -> Reply:
        if req.header("metadata-flavor") != "Google" or req.header("x-forwarded-for") is not None:
            return Reply(403, "Missing Metadata-Flavor:Google header.")
        if req.method != "GET" or req.path != "/computeMetadata/v1/instance/attributes/user-data":
            return Reply(404, "Not Found", {"Metadata-Flavor": "Google"})
        scripted = script.take("user-data")
        if scripted:
            scripted.headers.setdefault("Metadata-Flavor", "Google")
            return scripted
        if user_data is None:
            return Reply(404, "Not Found", {"Metadata-Flavor": "Google"})
        return Reply(200, base64.b64encode(user_data), {"Metadata-Flavor": "Google"})

    return handle


def ibmcloud(user_data: bytes | None, script: Script, *, tokens: TokenBook | None = None) -> Handler:
    """IBM Cloud VPC metadata service: identity token, then the instance initialization JSON."""
    book = tokens or TokenBook()

    def handle(req: Request) -> Reply:
        if req.path == "/instance_identity/v1/token":
            if req.method != "PUT":
                return Reply(405, "")
            scripted = script.take("token")
            if scripted:
                return scripted
            if req.header("metadata-flavor") != "ibm" or not req.query.get("version"):
                return Reply(400, json.dumps({"errors": [{"code": "bad_request"}]}))
            try:
                expires = json.loads(req.body or b"{}").get("expires_in", 300)
            except ValueError:
                return Reply(400, "bad json")
            if not isinstance(expires, int) or not 5 <= expires <= 3600:
                return Reply(400, "expires_in out of range")
            tok = book.issue()
            return Reply(
                200, json.dumps({"access_token": tok, "expires_in": expires}), {"Content-Type": "application/json"}
            )
        if req.path == "/metadata/v1/instance/initialization" and req.method == "GET":
            auth = req.header("authorization") or ""
            if not auth.startswith("Bearer ") or not book.ok(auth[7:]):
                return Reply(401, json.dumps({"errors": [{"code": "unauthorized"}]}))
            if not req.query.get("version"):
                return Reply(400, "version required")
            scripted = script.take("user-data")
            if scripted:
                return scripted
            doc = {"keys": [], "default_trusted_profile": {"auto_link": False}}
            if user_data is not None:
                doc["user_data"] = user_data.decode("utf-8", "surrogateescape")
            return Reply(200, json.dumps(doc), {"Content-Type": "application/json"})
        return NOT_FOUND

    return handle


# The metadata versions Nova serves (and writes on a config drive), oldest first.
NOVA_VERSIONS = ("2012-08-10", "2013-04-04", "2016-06-30", "2018-08-27", "2020-10-14", "latest")
NOVA_META_DATA = {
    "uuid": "0b7b6a6e-3c2d-4a57-9d0e-5f6a1c2b3d4e",
    "name": "podvm-nginx-6b8f9",
    "hostname": "podvm-nginx-6b8f9.novalocal",
    "launch_index": 0,
    "availability_zone": "nova",
    "project_id": "b397a608f93148acaf55e5223a445814",
    "devices": [],
}


def openstack(user_data: bytes | None, script: Script) -> Handler:
    """Nova's metadata service: `openstack/latest/user_data` is the raw bytes (404 when the
    instance has none), `meta_data.json` describes the instance.  Routes: ``user-data``, ``meta-data``."""

    def handle(req: Request) -> Reply:
        if req.method != "GET":
            return Reply(405, "405 Method Not Allowed")
        if req.path == "/openstack/latest/user_data":
            scripted = script.take("user-data")
            if scripted:
                return scripted
            if user_data is None:
                return Reply(404, "404 Not Found\n\nThe resource could not be found.\n")
            return Reply(200, user_data, {"Content-Type": "text/plain; charset=UTF-8"})
        if req.path == "/openstack/latest/meta_data.json":
            scripted = script.take("meta-data")
            if scripted:
                return scripted
            return Reply(200, json.dumps(NOVA_META_DATA), {"Content-Type": "application/json"})
        if req.path in ("/openstack", "/openstack/"):
            return Reply(200, "\n".join(NOVA_VERSIONS))
        return NOT_FOUND

    return handle


FACTORIES = {
    "azure": azure,
    "aws": aws,
    "gcp": gcp,
    "alibaba": alibaba,
    "ibmcloud": ibmcloud,
    "openstack": openstack,
}

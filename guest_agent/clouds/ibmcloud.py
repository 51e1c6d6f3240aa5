"""IBM Cloud VPC: the cidata config disk when present, else the metadata service.

Metadata service (IBM VPC docs): PUT /instance_identity/v1/token?version=... with
`Metadata-Flavor: ibm` and a JSON body {"expires_in": N}; the JSON answer carries
`access_token`.  Then GET /metadata/v1/instance/initialization?version=... with
`Authorization: Bearer <token>`; its JSON holds `user_data` (raw cloud-config).
"""

from __future__ import annotations

import json

from guest_agent.clouds import FetchContext, cidata
from guest_agent.clouds.http import is_token, parse_json, request, retry_or_fail
from guest_agent.errors import MetadataUnavailable
from guest_agent.transport import Retry


def parse_token(body: bytes) -> str:
    doc = parse_json(body, "IBM metadata token answer")
    tok = doc.get("access_token") if isinstance(doc, dict) else None
    if tok is None:
        raise Retry("IBM metadata token answer has no access_token")
    if not isinstance(tok, str) or not is_token(tok):
        raise Retry("IBM metadata token answer has no usable access_token")
    return tok


def parse_initialization(body: bytes) -> bytes:
    doc = parse_json(body, "IBM metadata initialization answer")
    ud = doc.get("user_data") if isinstance(doc, dict) else None
    if not isinstance(ud, str) or not ud:
        raise Retry("IBM metadata initialization has no user_data")
    return ud.encode("utf-8")


def fetch(ctx: FetchContext) -> bytes:
    if "ibm_checked_disk" not in ctx.state:
        ctx.state["ibm_checked_disk"] = True
        data = cidata.find_disk(ctx.root, ctx.cfg.cidata, ctx.cfg.limits.max_user_data_bytes, wait_s=0)
        if data is not None:
            return data
    c = ctx.cfg.ibmcloud
    base = c.metadata_url.rstrip("/")
    token = ctx.state.get("ibm_token")
    if token is None:
        resp = request(
            ctx,
            "PUT",
            f"{base}/instance_identity/v1/token?version={c.api_version}",
            headers={"Metadata-Flavor": "ibm", "Content-Type": "application/json", "Accept": "application/json"},
            data=json.dumps({"expires_in": c.token_expires_s}).encode(),
        )
        if resp.status != 200:
            if resp.status in (400, 401, 403):
                raise MetadataUnavailable("IBM metadata service refused the identity token", status=resp.status)
            raise retry_or_fail(resp, "IBM metadata token")
        token = ctx.state["ibm_token"] = parse_token(resp.body)
    resp = request(
        ctx,
        "GET",
        f"{base}/metadata/v1/instance/initialization?version={c.api_version}",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )
    if resp.status == 401:
        ctx.state.pop("ibm_token", None)
        raise Retry("IBM metadata token expired (401)")
    if resp.status != 200:
        raise retry_or_fail(resp, "IBM metadata initialization")
    return parse_initialization(resp.body)

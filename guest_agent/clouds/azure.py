"""Azure IMDS user-data: `compute/userData`, base64 text, `Metadata: true` (Microsoft Learn,
"Azure Instance Metadata Service"; cloud-init DataSourceAzure)."""

from __future__ import annotations

from guest_agent import codec
from guest_agent.clouds import FetchContext
from guest_agent.clouds.http import request, require_body, retry_or_fail

# IMDS rejects requests without this header, and any with X-Forwarded-For.
HEADERS = {"Metadata": "true"}


def parse_user_data(body: bytes) -> bytes:
    """userData is the base64 of what CreateVM was given; a decode error is not retried."""
    return codec.b64decode_strict(body, what="Azure userData")


def fetch(ctx: FetchContext) -> bytes:
    url = ctx.cfg.azure.imds_url.rstrip("/") + ctx.cfg.azure.user_data_path
    resp = request(ctx, "GET", url, headers=HEADERS)
    if resp.status != 200:
        raise retry_or_fail(resp, "Azure IMDS userData")
    return parse_user_data(require_body(resp, "Azure IMDS userData"))

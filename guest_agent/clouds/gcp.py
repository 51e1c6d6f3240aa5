"""GCE metadata server by IP (no DNS this early), `Metadata-Flavor: Google` both ways.

CAA stores user-data base64-encoded (and sets user-data-encoding=base64), so it is
always decoded; the response must carry `Metadata-Flavor: Google` too (anything else
is not the metadata server).
"""

from __future__ import annotations

from guest_agent import codec
from guest_agent.clouds import FetchContext
from guest_agent.clouds.http import request, require_body, retry_or_fail
from guest_agent.transport import Retry

PATH = "/computeMetadata/v1/instance/attributes/user-data"
HEADERS = {"Metadata-Flavor": "Google"}


def fetch(ctx: FetchContext) -> bytes:
    resp = request(ctx, "GET", ctx.cfg.gcp.metadata_url.rstrip("/") + PATH, headers=HEADERS)
    if resp.status != 200:
        raise retry_or_fail(resp, "GCE metadata user-data")
    if resp.headers.get("metadata-flavor") != "Google":
        raise Retry("GCE metadata answer lacks Metadata-Flavor: Google")
    return codec.b64decode_strict(require_body(resp, "GCE metadata user-data"), what="GCE user-data")

"""OpenStack: the config drive when one is attached, else Nova's metadata service (docs/protocols.md §8).

1. Before the network wait, and again at every attempt, the block devices are scanned for an
   ISO9660 volume labelled `config-2` (Nova's default drive format) and `openstack/latest/user_data`
   is read from the device, no mount.  A drive found before the wait spares it (the instance may
   have no metadata service).  A drive without that file means no user-data.
2. Otherwise `GET <metadata_url>/openstack/latest/user_data`: the raw bytes Nova stored.  Nova
   answers 404 when the instance has none; a metadata proxy in front of it may answer 404 too
   while it cannot yet tell which instance asks.  So a 404 counts as "no user-data" only once
   `openstack/latest/meta_data.json`, which Nova serves for every instance it knows, is a JSON
   object; until then it is retried (cloud-init's OpenStack reader also requires meta_data.json and
   not user_data).

"No user-data" returns b"": the agent writes CAA's default initdata only, as CAA's own
process-user-data does when no source has user-data.
"""

from __future__ import annotations

from guest_agent.clouds import FetchContext, cidata
from guest_agent.clouds.http import parse_json, request, require_body, retry_or_fail
from guest_agent.config import Config
from guest_agent.log import fields, logger
from guest_agent.transport import Retry, http_retry_reason

log = logger("guest_agent.openstack")

USER_DATA = "openstack/latest/user_data"
META_DATA = "openstack/latest/meta_data.json"
NO_USER_DATA = b""


def read_local(cfg: Config, root: str) -> bytes | None:
    """user_data from an attached config drive; NO_USER_DATA if the drive has none; None: no drive.
    Read before the network wait (boot.run, in a "local" stage), and again by every fetch() attempt."""
    labels = cfg.openstack.config_drive_labels
    found = cidata.find_volume(root, cfg.cidata.dev_dir, labels, USER_DATA, cfg.limits.max_user_data_bytes)
    if found is None:
        return None
    name, data = found
    log.info(
        "found the config drive%s",
        "" if data is not None else f"; it has no {USER_DATA}: no user-data, default initdata only",
        extra=fields(stage="fetch", device=name),
    )
    return NO_USER_DATA if data is None else data


def fetch(ctx: FetchContext) -> bytes:
    data = read_local(ctx.cfg, ctx.root)
    if data is not None:
        return data
    base = ctx.cfg.openstack.metadata_url.rstrip("/")
    resp = request(ctx, "GET", f"{base}/{USER_DATA}", headers={})
    if resp.status == 200:
        return require_body(resp, "OpenStack metadata user_data")
    if resp.status != 404:
        raise retry_or_fail(resp, "OpenStack metadata user_data")
    meta = request(ctx, "GET", f"{base}/{META_DATA}", headers={"Accept": "application/json"})
    if meta.status != 200:
        raise Retry(f"OpenStack metadata user_data: HTTP 404, and meta_data.json {http_retry_reason(meta.status, b'')}")
    if not isinstance(parse_json(meta.body, "OpenStack meta_data.json"), dict):
        raise Retry("OpenStack meta_data.json is not a JSON object")
    log.info(
        "the metadata service has no user_data for this instance: default initdata only", extra=fields(stage="fetch")
    )
    return NO_USER_DATA

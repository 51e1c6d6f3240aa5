"""EC2 IMDS: IMDSv2 token, then user-data, raw bytes; IMDSv1 only if the token fails.

The TTL is the maximum (21600 s, like cloud-init and afterburn): a token must not
expire during a slow boot.
"""

from __future__ import annotations

from guest_agent.clouds import FetchContext
from guest_agent.clouds.tokenflow import Flavour, fetch_with

FLAVOUR = Flavour(
    name="EC2 IMDS",
    token_path="/latest/api/token",
    ttl_header="X-aws-ec2-metadata-token-ttl-seconds",
    token_header="X-aws-ec2-metadata-token",
    data_path="/latest/user-data",
)


def fetch(ctx: FetchContext) -> bytes:
    return fetch_with(ctx, FLAVOUR, ctx.cfg.aws.imds_url, ctx.cfg.aws.token_ttl_s)

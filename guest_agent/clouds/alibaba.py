"""Alibaba ECS metadata: hardened-mode token (cloud-init DataSourceAliYun), raw user-data.

CAA's guest does a bare GET, which fails on instances created with HttpTokens=required;
we try the token first and fall back to the bare GET, as on AWS.
"""

from __future__ import annotations

from guest_agent.clouds import FetchContext
from guest_agent.clouds.tokenflow import Flavour, fetch_with

FLAVOUR = Flavour(
    name="Alibaba ECS metadata",
    token_path="/latest/api/token",
    ttl_header="X-aliyun-ecs-metadata-token-ttl-seconds",
    token_header="X-aliyun-ecs-metadata-token",
    data_path="/latest/user-data",
)


def fetch(ctx: FetchContext) -> bytes:
    return fetch_with(ctx, FLAVOUR, ctx.cfg.alibaba.metadata_url, ctx.cfg.alibaba.token_ttl_s)

"""Session-token metadata flows with a tokenless fallback (AWS IMDSv2, Alibaba hardened mode).

1. PUT the token URL with a TTL header.  200: use the token.  Any other answer
   (IMDSv2 unsupported, token endpoint broken) falls back to a tokenless GET: what
   CAA does since PR #3058, and cloud-init/afterburn before it.
2. GET user-data with the token header (or without one on fallback).
   401 with a token means it expired: drop it, fetch a new one (cloud-init).
   401/403 without a token means tokens are required: fail fast unless the token
   request itself failed with a retryable status.
"""

from __future__ import annotations

from dataclasses import dataclass

from guest_agent.clouds import FetchContext
from guest_agent.clouds.http import Response, is_token, request, require_body, retry_or_fail
from guest_agent.errors import MetadataUnavailable
from guest_agent.transport import RETRY_STATUS, Retry, http_retry_reason


@dataclass(frozen=True, slots=True)
class Flavour:
    """One cloud's paths and header names."""

    name: str  # for messages: "EC2 IMDS"
    token_path: str
    ttl_header: str
    token_header: str
    data_path: str


class TokenFlow:
    def __init__(self, flavour: Flavour, base_url: str, ttl_s: int) -> None:
        self.f = flavour
        self.base = base_url.rstrip("/")
        self.ttl_s = ttl_s
        self.token: str | None = None
        self.token_failure: Response | None = None  # why we are on the tokenless fallback

    def _get_token(self, ctx: FetchContext) -> None:
        resp = request(ctx, "PUT", self.base + self.f.token_path, headers={self.f.ttl_header: str(self.ttl_s)})
        token = resp.body.strip().decode("ascii", "replace")
        if resp.status == 200 and is_token(token):
            self.token, self.token_failure = token, None
        else:
            self.token, self.token_failure = None, resp

    def fetch(self, ctx: FetchContext) -> bytes:
        if self.token is None:
            self._get_token(ctx)
        headers = {self.f.token_header: self.token} if self.token else {}
        resp = request(ctx, "GET", self.base + self.f.data_path, headers=headers)
        what = f"{self.f.name} user-data"
        if resp.status == 200:
            return require_body(resp, what)
        if resp.status == 401 and self.token:
            self.token = None
            raise Retry(f"{what}: session token expired (401)")
        if resp.status in (401, 403) and not self.token:
            tf = self.token_failure
            if tf is not None and tf.status in RETRY_STATUS:
                self.token = None
                raise Retry(f"{self.f.name} token request: {http_retry_reason(tf.status, tf.body)}")
            raise MetadataUnavailable(
                f"{self.f.name} refused the session token and requires one",
                token_status=tf.status if tf else None,
                status=resp.status,
            )
        raise retry_or_fail(resp, what)


def fetch_with(ctx: FetchContext, flavour: Flavour, base_url: str, ttl_s: int) -> bytes:
    """One attempt; the flow (and its token) lives in the context across attempts."""
    flow = ctx.state.get(flavour.name)
    if not isinstance(flow, TokenFlow):
        flow = ctx.state[flavour.name] = TokenFlow(flavour, base_url, ttl_s)
    return flow.fetch(ctx)

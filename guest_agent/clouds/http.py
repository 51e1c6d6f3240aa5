"""One metadata HTTP request, with failures sorted into retry / fail fast."""

from __future__ import annotations

from dataclasses import dataclass

from guest_agent.clouds import FetchContext
from guest_agent.errors import MetadataUnavailable
from guest_agent.transport import RETRY_STATUS, Retry, http_retry_reason, parse_retry_after, timeout_for


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def request(
    ctx: FetchContext, method: str, url: str, *, headers: dict[str, str], data: bytes | None = None
) -> Response:
    """Connection errors and timeouts become `Retry`; every HTTP answer is returned."""
    import requests

    fc = ctx.cfg.fetch
    try:
        r = ctx.session.request(
            method,
            url,
            headers=headers,
            data=data,
            timeout=timeout_for(ctx.deadline, fc.connect_timeout_s, fc.read_timeout_s),
            allow_redirects=False,
            stream=True,
        )
        with r:
            # Bounded read: an untrusted answer cannot make the agent buffer more than this.
            body = r.raw.read(ctx.cfg.limits.max_user_data_bytes * 2 + 1, decode_content=True)
    except requests.Timeout as exc:
        raise Retry(f"timed out ({type(exc).__name__})") from None
    except requests.ConnectionError as exc:
        raise Retry(f"connection failed ({_root_cause(exc)})") from None
    return Response(r.status_code, {k.lower(): v for k, v in r.headers.items()}, body)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc).split(":")[-1].strip() or type(exc).__name__


def retry_or_fail(resp: Response, what: str) -> Retry:
    """For a non-200 answer: a `Retry` to raise, or raise MetadataUnavailable (fail fast)."""
    reason = http_retry_reason(resp.status, resp.body)
    if resp.status in RETRY_STATUS:
        return Retry(f"{what}: {reason}", retry_after_s=parse_retry_after(resp.headers.get("retry-after")))
    raise MetadataUnavailable(f"{what} was refused by the metadata service", status=resp.status, detail=reason)


def is_token(value: str) -> bool:
    """A session token we can send back: visible ASCII only (RFC 9110 §5.5 field values).
    Anything else (a broken or hostile answer) would make requests raise on the next call."""
    return bool(value) and all("!" <= c <= "~" for c in value)


def require_body(resp: Response, what: str) -> bytes:
    body = resp.body.strip()
    if not body:
        # Azure returns an empty body when no userData was set; it may also be "not yet".
        raise Retry(f"{what}: empty user-data")
    return resp.body

"""One metadata HTTP request (httpio.exchange), with failures sorted into retry / fail fast."""

from __future__ import annotations

import codecs
import json
import re

from guest_agent import httpio
from guest_agent.clouds import FetchContext
from guest_agent.errors import MetadataUnavailable, UserDataInvalid
from guest_agent.httpio import Response
from guest_agent.transport import RETRY_STATUS, Retry, budget_s, retry_or_raise

__all__ = ["Response", "is_token", "parse_json", "request", "require_body", "retry_or_fail"]


def request(
    ctx: FetchContext, method: str, url: str, *, headers: dict[str, str], data: bytes | None = None
) -> Response:
    """Transport faults become `Retry` (httpio); every HTTP answer is returned.

    The body bound is twice the user-data limit (room for base64 or a JSON wrapper); an answer
    past it is refused as too large (exit 78), never truncated into a misleading decode error.
    """
    fc, limit = ctx.cfg.fetch, ctx.cfg.limits.max_user_data_bytes * 2
    try:
        return httpio.exchange(
            method,
            url,
            headers=headers,
            body=data,
            budget_s=budget_s(ctx.deadline, fc.connect_timeout_s, fc.read_timeout_s),
            connect_timeout_s=fc.connect_timeout_s,
            max_body=limit,
        )
    except httpio.ResponseTooLarge as exc:
        raise UserDataInvalid("the metadata answer is larger than the size limit", **exc.supporting_data) from None


def retry_or_fail(resp: Response, what: str) -> Retry:
    """For a non-200 answer: a `Retry` to raise, or raise MetadataUnavailable (fail fast)."""
    return retry_or_raise(
        resp,
        what,
        retry_status=RETRY_STATUS.__contains__,
        refused=lambda reason: MetadataUnavailable(
            f"{what} was refused by the metadata service", status=resp.status, detail=reason
        ),
    )


def is_token(value: str) -> bool:
    """A session token we can send back: visible ASCII only (RFC 9110 §5.5 field values).
    Anything else (a broken or hostile answer) is not echoed into a request header."""
    return bool(value) and all("!" <= c <= "~" for c in value)


JSON_MAX_DEPTH = 32  # a metadata answer is a flat object or two deep
_UTF8_SIG = codecs.lookup("utf-8-sig")  # looked up now: its module would load after the route
# What json_depth looks at: a backslash escape (inside a string it hides the next byte, outside
# one json.loads refuses the text there), a quote, or a bracket.  Fixed-length alternatives, so
# finditer never backtracks: linear in the body.  (A string regex needs a repeated group, whose
# possessive form CPython before 3.11.5 matches wrongly: gh-106052.)
_JSON_TOKEN = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


def json_depth(body: bytes) -> int:
    """The deepest nesting of `[`/`{` in a JSON text, counted without recursion (strings skipped)."""
    depth = deepest = 0
    in_string = False
    for m in _JSON_TOKEN.finditer(body):
        token = m.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or token[0] == 0x5C:
            continue
        elif token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(body: bytes, what: str) -> object:
    """A metadata JSON answer, bounded in depth first: `json.loads` recurses and would raise
    RecursionError on a few thousand brackets.  Anything unusable is a `Retry`."""
    # UTF-8 only (RFC 8259 §8.1), decoded here: json.loads would detect UTF-16/32 in bytes, whose
    # code units can hold a 0x22 byte that json_depth takes for a quote, hiding real brackets.
    try:
        text = _UTF8_SIG.decode(body)[0]
    except UnicodeDecodeError:
        raise Retry(f"{what} is not UTF-8 JSON") from None
    if json_depth(body) > JSON_MAX_DEPTH:
        raise Retry(f"{what} is nested deeper than {JSON_MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise Retry(f"{what} is not JSON") from None


def require_body(resp: Response, what: str) -> bytes:
    body = resp.body.strip()
    if not body:
        # Azure returns an empty body when no userData was set; it may also be "not yet".
        raise Retry(f"{what}: empty user-data")
    return resp.body

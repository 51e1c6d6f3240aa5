"""TOML for the agent's config files and CoCo initdata: `tomllib`, every refusal one exception.

`tomllib.loads` refuses a malformed document with TOMLDecodeError, but lets two refusals of
hostile input through as other exceptions: ValueError from `int()` of more than 4300 digits, and
RecursionError from deeply nested arrays or inline tables.  `loads` turns all three into
`DecodeError`, so a caller maps every refusal to its own error (exit 78) and none ends as an
internal error.  Bounds on the document's size and structure are the caller's:
`initdata.structure()` scans host-supplied initdata before it gets here.
"""

from __future__ import annotations

import tomllib
from typing import Any


class DecodeError(ValueError):
    """tomllib refused the document; its message (positions only, no document text), the
    original exception as __cause__."""


def loads(text: str) -> dict[str, Any]:
    """`tomllib.loads(text)`; raises `DecodeError` wherever tomllib refuses the document."""
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(str(exc)) from exc

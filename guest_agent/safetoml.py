"""A small TOML reader for the documents on the boot path; anything else goes to `tomllib`.

`import tomllib` compiles a dozen regular expressions (re's compiler, and enum with it): under
TCG that is ~0.35 s of the agent's start, before the lease.  The documents the agent reads at
boot are simple: CoCo initdata (trustee `initdata` spec: `algorithm = "..."`, `version = "..."`,
a `[data]` table of quoted names and '''...''' strings) and the agent's own config files.  This
module reads exactly that subset, line by line, and returns what `tomllib.loads` would return
for it; for anything outside the subset, or any doubt, it hands the whole text to
`tomllib.loads` (imported only then), as `safeyaml.compose_block` hands documents to libyaml.
So every error, and its message, is tomllib's (TOMLDecodeError as `DecodeError`).

The subset (TOML 1.0, https://toml.io/en/v1.0.0):
- comment lines, blank lines, `# comment` after a value or header;
- table headers `[name]` (no dots, no spaces inside the brackets, each table once);
- `key = value` lines, key bare (A-Za-z0-9_-) or quoted (one-line basic or literal string),
  no dotted keys, each key once per table;
- values: one-line basic strings with the escapes \\b \\t \\n \\f \\r \\" \\\\ ; one-line literal
  strings; multi-line literal strings and multi-line basic strings without backslashes, opening
  on the key's line (their first newline trimmed); decimal integers (no underscores, no leading
  zero); decimal floats `[+-]digits.digits` (no exponent, no underscores); numbers of at most
  24 characters; `true`, `false`; one-line arrays of those scalars (no multi-line strings).
Not in the subset (deferred): CR anywhere, any control character other than tab and newline,
any other non-printable character, \\u escapes, dates and times, hex/octal/binary, exponents,
inf/nan, inline tables, nested or multi-line arrays, arrays of tables, dotted keys or headers.

Bounded like tomllib's caller expects: no recursion, one pass, every scan a `str.find` or a loop
that advances; numbers are length-capped before `int()`/`float()` (tomllib's `int()` of 5000
digits raises ValueError, which the fallback keeps).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_WS = " \t"
_MAX_NUMBER = 24  # characters of a number: far below int()'s 4300-digit limit


class DecodeError(ValueError):
    """The document is not TOML this reader or tomllib will read: tomllib's TOMLDecodeError, and
    the two refusals tomllib lets through as other exceptions (ValueError from `int()` of more than
    4300 digits, RecursionError from deep nesting), same message (the original is the __cause__).
    Callers catch this one without importing tomllib."""


def loads(text: str) -> dict[str, Any]:
    """`tomllib.loads(text)`, without importing tomllib when `text` is in the subset.

    Raises `DecodeError` wherever tomllib refuses the document."""
    doc = read_subset(text)
    if doc is not None:
        return doc
    import tomllib  # a document outside the subset: tomllib decides

    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(str(exc)) from exc


class _Defer(Exception):
    """Outside the subset: `tomllib` reads the document."""


def read_subset(text: str) -> dict[str, Any] | None:
    """The document as `tomllib.loads` returns it if it is in the subset, else None."""
    if "\r" in text or not text.replace("\t", "").replace("\n", "").isprintable():
        return None
    try:
        return _Reader(text).document()
    except _Defer:
        return None


class _Reader:
    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def document(self) -> dict[str, Any]:
        text, n = self.text, len(self.text)
        root: dict[str, Any] = {}
        table = root
        while self.pos < n:
            self._skip_ws()
            c = text[self.pos] if self.pos < n else "\n"
            if c == "\n":
                self.pos += 1
                continue
            if c == "#":
                self._end_of_line()
                continue
            if c == "[":
                self.pos += 1
                name = self._key()
                if not text.startswith("]", self.pos) or name in root:
                    raise _Defer  # `[[`, spaces or dots inside, or a table (or key) defined twice
                self.pos += 1
                self._end_of_line()
                table = root[name] = {}
                continue
            key = self._key()
            self._skip_ws()
            if not text.startswith("=", self.pos) or key in table:
                raise _Defer  # a dotted key, a missing `=`, or a key defined twice
            self.pos += 1
            self._skip_ws()
            table[key] = self._value()
            self._end_of_line()
        return root

    # --- pieces ------------------------------------------------------------------------

    def _skip_ws(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _WS:
            pos += 1
        self.pos = pos

    def _end_of_line(self) -> None:
        """Whitespace, then a comment, a newline or the end: past the newline."""
        self._skip_ws()
        text, pos = self.text, self.pos
        if pos < len(text) and text[pos] == "#":
            nl = text.find("\n", pos)
            self.pos = len(text) if nl < 0 else nl + 1
        elif pos == len(text) or text[pos] == "\n":
            self.pos = pos + 1
        else:
            raise _Defer

    def _key(self) -> str:
        text, pos = self.text, self.pos
        if pos < len(text) and text[pos] in "\"'":
            if text.startswith(text[pos] * 3, pos):
                raise _Defer  # a multi-line string cannot be a key (tomllib says why)
            return self._one_line_string()
        end = pos
        while end < len(text) and text[end] in _BARE_KEY:
            end += 1
        if end == pos:
            raise _Defer
        self.pos = end
        return text[pos:end]

    def _value(self) -> Any:
        text, pos = self.text, self.pos
        c = text[pos] if pos < len(text) else "\n"
        if c in "\"'":
            if text.startswith(c * 3, pos):
                return self._multi_line_string(c)
            return self._one_line_string()
        if c == "[":
            return self._array()
        return self._scalar_token(_WS + "#\n")

    def _one_line_string(self) -> str:
        """A basic or literal string on one line (the opening quote at self.pos)."""
        text, start = self.text, self.pos
        q = text[start]
        nl = text.find("\n", start)
        if nl < 0:
            nl = len(text)
        end = text.find(q, start + 1, nl)
        if end < 0:
            raise _Defer  # unterminated
        body = text[start + 1 : end]
        if q == "'":
            self.pos = end + 1
            return body
        if "\\" not in body:
            self.pos = end + 1
            return body
        # Escapes: walk the body; an escaped quote means the real end lies further on.  `close`
        # is looked for again only when an escape consumed it: linear in the line's length.
        out: list[str] = []
        pos, close = start + 1, end
        while (b := text.find("\\", pos, close)) >= 0:
            out.append(text[pos:b])
            replacement = _ESCAPES.get(text[b + 1 : b + 2])
            if replacement is None:
                raise _Defer  # \u, \U, or an escape tomllib refuses
            out.append(replacement)
            pos = b + 2
            if close < pos and (close := text.find('"', pos, nl)) < 0:
                raise _Defer  # unterminated
        out.append(text[pos:close])
        self.pos = close + 1
        return "".join(out)

    def _multi_line_string(self, q: str) -> str:
        text = self.text
        start = self.pos + 3
        if text.startswith("\n", start):
            start += 1  # a newline right after the opening delimiter is trimmed
        end = text.find(q * 3, start)
        if end < 0 or text.startswith(q, end + 3):
            raise _Defer  # unterminated, or quotes just before the closing delimiter
        body = text[start:end]
        if q == '"' and "\\" in body:
            raise _Defer  # escapes and line-ending backslashes: tomllib's
        self.pos = end + 3
        return body

    def _array(self) -> list[Any]:
        text = self.text
        self.pos += 1  # the `[`
        out: list[Any] = []
        while True:
            self._skip_ws()
            c = text[self.pos] if self.pos < len(text) else "\n"
            if c == "]":
                self.pos += 1
                return out
            if c in "\"'":
                if text.startswith(c * 3, self.pos):
                    raise _Defer
                out.append(self._one_line_string())
            elif c in "[{#\n":
                raise _Defer  # nested, an inline table, a comment or a line break inside
            else:
                out.append(self._scalar_token(_WS + ",]#\n"))
            self._skip_ws()
            if text.startswith(",", self.pos):
                self.pos += 1
            elif not text.startswith("]", self.pos):
                raise _Defer

    def _scalar_token(self, stops: str) -> bool | int | float:
        text, start = self.text, self.pos
        end = start
        while end < len(text) and text[end] not in stops:
            end += 1
        token = text[start:end]
        self.pos = end
        if token == "true":
            return True
        if token == "false":
            return False
        if not 0 < len(token) <= _MAX_NUMBER:
            raise _Defer
        digits = token[1:] if token[0] in "+-" else token
        whole, dot, frac = digits.partition(".")
        if not whole or not _DIGITS.issuperset(whole) or (len(whole) > 1 and whole[0] == "0"):
            raise _Defer
        if not dot:
            return int(token)
        if not frac or not _DIGITS.issuperset(frac):
            raise _Defer
        return float(token)

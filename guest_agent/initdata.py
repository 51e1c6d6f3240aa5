"""Initdata: decode, validate and digest the TOML document CAA delivers in /run/peerpod/initdata.

Pure functions only (no I/O). The wire format is CAA's `initdata.Encode`: gzip, then standard
base64 on one line; user-data's YAML block scalar adds one trailing newline
(docs/protocols.md §2). The document is the trustee initdata TOML:

    algorithm = "sha256" | "sha384" | "sha512"
    version = "0.1.0"
    [data]
    "aa.toml" = '''...'''

The digest is H(decompressed TOML bytes) with H named by `algorithm`, and CAA extends the
sha256 bank of PCR 8 with its first 32 bytes whatever the algorithm (CAA PR #2186), so a
verifier replays PCR8 = SHA256(0x00*32 || digest[:32]).

Policy differences from CAA (`extractInitdataAndHash`): a `[data]` name outside the allow-list
is skipped (and reported in `Initdata.skipped`) only when it is a plain file name; one with a
`/`, `.`/`..`, a control character or over 255 bytes is refused whole, as is every name in
strict mode.  Names are compared exactly (CAA compares after `filepath.Join`, so it also
accepts e.g. "./aa.toml").

The document is read by `tomllib` (through `safetoml`).  `tomllib` recurses once per nested
array or inline table, spends time quadratic in the length of a dotted key, and turns integers
with `int()`, so before it runs, `structure()` scans the document (outside strings and comments)
and refuses more than `MAX_DEPTH` levels or `MAX_ITEMS` keys and values; a 5000-digit integer and
a nesting the scan missed are safetoml's DecodeError like any other, so the same "not valid TOML"
refusal.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from guest_agent import safetoml
from guest_agent.codec import b64decode_strict, gunzip_bounded
from guest_agent.errors import UserDataInvalid, show

# CAA writes this when user-data carries no initdata (no trailing newline), so the digest and
# PCR 8 are still defined; sha256 = adb48cc1...66478d.
DEFAULT_INITDATA_TOML: bytes = b"algorithm = \"sha256\"\nversion = \"0.1.0\"\n\n[data]\n\"aa.toml\" = '''\n'''"

# Files initdata may carry; each lands in /run/peerpod/<name>.
ALLOWED_DATA_NAMES: tuple[str, ...] = ("aa.toml", "cdh.toml", "policy.rego")

ALGORITHMS: tuple[str, ...] = ("sha256", "sha384", "sha512")

MAX_DEPTH = 32  # arrays, inline tables and dotted-key parts; the initdata spec needs 1 ([data])
MAX_ITEMS = 10_000  # lines, keys and values outside strings; the initdata spec has about 20
NAME_MAX = 255

PCR_EXTEND_LEN = 32  # the sha256 bank: CAA passes `head -c64` of the hex digest to tpm2_pcrextend


@dataclass(frozen=True, slots=True)
class Initdata:
    """A parsed, digested initdata document."""

    algorithm: str
    version: str
    digest: bytes
    files: tuple[tuple[str, bytes], ...]  # (name in ALLOWED_DATA_NAMES, UTF-8 content), document order
    skipped: tuple[str, ...] = ()  # well-formed [data] names outside ALLOWED_DATA_NAMES (not strict)

    def __repr__(self) -> str:
        return f"Initdata(algorithm={self.algorithm!r}, digest={self.digest_hex}, files={[n for n, _ in self.files]})"

    @property
    def digest_hex(self) -> str:
        """Lowercase hex, what CAA writes (without newline) to /run/peerpod/initdata.digest."""
        return self.digest.hex()

    @property
    def pcr_extend_value(self) -> bytes:
        """The 32 bytes CAA extends into PCR 8's sha256 bank: the digest truncated, whatever the algorithm."""
        return self.digest[:PCR_EXTEND_LEN]


def decode_file(raw: bytes, *, limit: int) -> bytes:
    """/run/peerpod/initdata content (base64 of gzip, whitespace tolerated) -> the TOML bytes.

    `limit` bounds the decompressed size (gzip bombs).
    """
    compressed = b64decode_strict(raw, what="initdata", limit=limit)
    return gunzip_bounded(compressed, limit=limit, what="initdata")


def encode_file(toml_bytes: bytes) -> bytes:
    """The inverse of `decode_file`: gzip (mtime 0, so deterministic) then base64, one line, no newline."""
    return base64.b64encode(gzip.compress(toml_bytes, mtime=0))


_SPECIAL = "\"'#[]{}=,.\n"  # what structure() looks at; everything else it jumps over

# String bodies.  Each scanner below finds the next delimiter with str.find and remembers it
# across backslash escapes, so a body full of escapes is still read in linear time.  Not a regex:
# one that never restarts needs possessive repeats of groups, which CPython before 3.11.5 (Debian
# 12's 3.11.2) matches wrongly (gh-106052), and plain greedy groups keep backtracking state per
# repeat (memory in proportion to a hostile body).


def _basic_body_end(text: str, j: int) -> int:
    """Where a one-line basic string's body starting at `j` stops: its closing quote, a newline,
    a backslash before a newline or the end, or the end (the regex (?:[^"\\\n]|\\[^\n])*)."""
    nl = text.find("\n", j)
    if nl < 0:
        nl = len(text)
    q = text.find('"', j, nl)
    while (b := text.find("\\", j, q if q >= 0 else nl)) >= 0:
        if b + 1 >= nl:
            return b  # a backslash escapes no newline and no end
        j = b + 2
        if 0 <= q < j:  # that backslash escaped the quote
            q = text.find('"', j, nl)
    return q if q >= 0 else nl


def _literal_body_end(text: str, j: int) -> int:
    """[^'\n]*: the next quote or newline, else the end."""
    nl = text.find("\n", j)
    if nl < 0:
        nl = len(text)
    q = text.find("'", j, nl)
    return q if q >= 0 else nl


def _ml_basic_body_end(text: str, j: int) -> int:
    """Where a multi-line basic string's body starting at `j` stops: the first unescaped three
    quotes, a backslash at the end, or the end (the regex (?:[^"\\]|\\.|"(?!""))* with DOTALL)."""
    t = text.find('"""', j)
    while (b := text.find("\\", j, t if t >= 0 else len(text))) >= 0:
        if b + 1 >= len(text):
            return b
        j = b + 2
        if 0 <= t < j:  # that backslash escaped the first quote
            t = text.find('"""', j)
    return t if t >= 0 else len(text)


def _string_end(text: str, start: int) -> int:
    """Where the TOML string opening at `start` ends, exactly as tomllib reads it.

    Basic strings have backslash escapes, literal strings none; a one-line string stops at a
    newline (an error tomllib reports, so nothing after it is parsed); a multi-line string's
    closing delimiter may carry up to two extra quotes (three quotes, a, four quotes is the string `a"`).
    """
    q = text[start]
    if text.startswith(q * 3, start):
        if q == "'":
            j = text.find("'''", start + 3)
        else:
            end = _ml_basic_body_end(text, start + 3)
            j = end if text.startswith(q * 3, end) else -1
        if j < 0:
            return len(text)
        run = 3
        while run < 5 and text.startswith(q, j + run):
            run += 1
        return j + run
    end = (_literal_body_end if q == "'" else _basic_body_end)(text, start + 1)
    return end + 1 if text.startswith(q, end) else end  # at a newline: tomllib stops there too


def _significant(text: str) -> Iterator[str]:
    """The significant characters of a TOML document in order: `=`, `,`, `.`, brackets, braces,
    newlines, and one `#`, `"` or `'` per comment or string, whose rest is skipped.

    `ahead` holds each significant character's next position (len(text) when there is none), so a
    step is a min() and one str.find, and only a skipped string or comment makes the positions it
    jumped over be looked up again (no regex: importing re costs the boot path under TCG).
    """
    n = len(text)
    ahead = [n if (i := text.find(c)) < 0 else i for c in _SPECIAL]
    while (at := min(ahead)) < n:
        k = ahead.index(at)
        c, pos = _SPECIAL[k], at + 1
        ahead[k] = n if (i := text.find(c, pos)) < 0 else i
        if c in "#\"'":
            if c == "#":
                nl = text.find("\n", pos)
                pos = n if nl < 0 else nl + 1
            else:
                pos = _string_end(text, at)
            for k, i in enumerate(ahead):
                if i < pos:
                    ahead[k] = n if (i := text.find(_SPECIAL[k], pos)) < 0 else i
        yield c


def structure(text: str, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> tuple[int, int]:
    """(deepest nesting, items) of a TOML document, outside strings and comments; the scan stops
    early once either passes its maximum.

    Nesting counts open arrays and inline tables plus the dots of the current dotted key
    (`a.b.c = 1` is three tables deep: tomllib's time per dotted key is quadratic in its length,
    16,000 parts took 3 s here).  Items count strings, comments and the other significant characters
    (`=`, `,`, brackets, braces, newlines), which bounds tomllib's work and this loop's.
    One pass, no recursion.
    """
    depth = dots = items = deepest = 0
    for c in _significant(text):
        if c == "#":
            dots = 0
        elif c == ".":
            dots += 1
            deepest = max(deepest, depth + dots)
            if deepest > max_depth:
                break
            continue
        items += 1
        if items > max_items:
            break
        if c in "#\"'":
            continue
        dots = 0
        if c in "]}":
            depth = max(depth - 1, 0)
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > max_depth:
                break
    return deepest, items


def _plain_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and name.isprintable()
        and len(name.encode("utf-8", "surrogatepass")) <= NAME_MAX
    )


def parse(toml_bytes: bytes, *, strict: bool = False) -> Initdata:
    """Validate the initdata TOML and compute its digest over exactly these bytes."""
    try:
        text = toml_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserDataInvalid("initdata is not valid UTF-8", offset=exc.start) from exc
    depth, items = structure(text)
    if depth > MAX_DEPTH:
        raise UserDataInvalid("initdata TOML is nested too deeply", field="initdata", limit=MAX_DEPTH)
    if items > MAX_ITEMS:
        raise UserDataInvalid("initdata TOML has too many lines, keys and values", field="initdata", limit=MAX_ITEMS)
    try:
        doc = safetoml.loads(text)
    except safetoml.DecodeError as exc:
        # The message carries only a position ("... (at line 3, column 9)"), no document content.
        raise UserDataInvalid("initdata is not valid TOML", error=str(exc)[:120]) from exc

    algorithm = doc.get("algorithm")
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        shown = show(algorithm, 32) if isinstance(algorithm, str) else type(algorithm).__name__
        raise UserDataInvalid(
            f"initdata algorithm {shown!r} is not supported (sha256, sha384 or sha512)", field="algorithm"
        )

    # CAA's struct field is a Go string: missing gives "", a non-string fails the TOML decode.
    version = doc.get("version", "")
    if not isinstance(version, str):
        raise UserDataInvalid("initdata version is not a string", field="version", type=type(version).__name__)

    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise UserDataInvalid("initdata [data] is not a table", field="data", type=type(data).__name__)
    files: list[tuple[str, bytes]] = []
    skipped: list[str] = []
    for name, value in data.items():
        shown = show(name, 64)
        if not isinstance(value, str):  # CAA: map[string]string, so a parse error whatever the name
            raise UserDataInvalid(
                f"initdata [data] value for {shown!r} is not a string", field="data", type=type(value).__name__
            )
        if name in ALLOWED_DATA_NAMES:
            files.append((name, value.encode("utf-8")))
        elif strict or not _plain_name(name):
            raise UserDataInvalid(
                f"initdata [data] names a file that is not allowed: {shown!r}",
                field="data",
                allowed=",".join(ALLOWED_DATA_NAMES),
            )
        else:
            skipped.append(name)

    digest = hashlib.new(algorithm, toml_bytes).digest()
    return Initdata(algorithm=algorithm, version=version, digest=digest, files=tuple(files), skipped=tuple(skipped))


def expected_pcr(initial: bytes, extend: bytes) -> bytes:
    """TPM2_PCR_Extend on a sha256 bank: new = SHA256(old || value). PCR 8 starts at 32 zero bytes."""
    if len(initial) != PCR_EXTEND_LEN or len(extend) != PCR_EXTEND_LEN:
        raise ValueError("sha256 PCR values and extend values are 32 bytes")
    return hashlib.sha256(initial + extend).digest()

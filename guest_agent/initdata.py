"""Initdata: decode, validate and digest the TOML document CAA delivers in /run/peerpod/initdata.

Pure functions only (no I/O). The wire format is CAA's `initdata.Encode`: gzip, then standard
base64 on one line; user-data's YAML block scalar adds one trailing newline
(research clouds.md §2.1-2.2). The document is the trustee initdata TOML:

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

`tomllib` recurses once per nested array or inline table and turns integers with `int()`, so
before it runs, `nesting_depth()` scans the document (outside strings and comments) and refuses
more than `MAX_DEPTH` levels; a ValueError from a 5000-digit integer and a RecursionError are
turned into the same "not valid TOML" refusal.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass

from guest_agent.codec import b64decode_strict, gunzip_bounded
from guest_agent.errors import UserDataInvalid
from guest_agent.safeyaml import show

# CAA writes this when user-data carries no initdata (no trailing newline), so the digest and
# PCR 8 are still defined; sha256 = adb48cc1...66478d.
DEFAULT_INITDATA_TOML: bytes = b"algorithm = \"sha256\"\nversion = \"0.1.0\"\n\n[data]\n\"aa.toml\" = '''\n'''"

# Files initdata may carry; each lands in /run/peerpod/<name>.
ALLOWED_DATA_NAMES: tuple[str, ...] = ("aa.toml", "cdh.toml", "policy.rego")

ALGORITHMS: tuple[str, ...] = ("sha256", "sha384", "sha512")

MAX_DEPTH = 32  # arrays and inline tables; the initdata spec needs 1 ([data])
NAME_MAX = 255

PCR_EXTEND_LEN = 32  # the sha256 bank: CAA passes `head -c64` of the hex digest to tpm2_pcrextend


@dataclass(frozen=True)
class Initdata:
    algorithm: str
    version: str
    digest: bytes
    files: tuple[tuple[str, bytes], ...]  # (name in ALLOWED_DATA_NAMES, UTF-8 content), document order
    skipped: tuple[str, ...] = ()  # well-formed [data] names outside ALLOWED_DATA_NAMES (not strict)

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
    import base64
    import zlib

    co = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # wbits 16+: gzip container
    return base64.b64encode(co.compress(toml_bytes) + co.flush())


def nesting_depth(text: str, stop: int) -> int:
    """The deepest nesting of `[`/`{` outside strings and comments, counted up to `stop`.

    One pass, no recursion.  String rules follow TOML 1.0 as tomllib reads them: basic strings
    have backslash escapes and end at a newline (an error tomllib reports), literal strings have
    none, and a multi-line string's closing delimiter may carry up to two extra quotes
    (`\"\"\"a\"\"\"\"` is `a"`), so the scan leaves each string exactly where tomllib does.
    """
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif c in "\"'":
            triple = text.startswith(c * 3, i)
            i += 3 if triple else 1
            while i < n:
                d = text[i]
                if d == "\\" and c == '"':
                    i += 2
                elif triple and text.startswith(c * 3, i):
                    run = 3
                    while run < 5 and i + run < n and text[i + run] == c:
                        run += 1
                    i += run
                    break
                elif not triple and d == c:
                    i += 1
                    break
                elif not triple and d == "\n":
                    break
                else:
                    i += 1
        else:
            if c in "[{":
                depth += 1
                if depth > deepest:
                    deepest = depth
                    if deepest >= stop:
                        return deepest
            elif c in "]}":
                depth = max(depth - 1, 0)
            i += 1
    return deepest


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
    if nesting_depth(text, MAX_DEPTH + 1) > MAX_DEPTH:
        raise UserDataInvalid("initdata TOML is nested too deeply", field="initdata", limit=MAX_DEPTH)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries only a position ("... (at line 3, column 9)"), no document content.
        raise UserDataInvalid("initdata is not valid TOML", error=str(exc)[:120]) from exc
    except (ValueError, RecursionError) as exc:  # int() past 4300 digits; nesting the scan missed
        raise UserDataInvalid("initdata is not valid TOML", error=type(exc).__name__) from None

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

"""Property-based fuzzing of the user-data decoders: only the agent's own errors may escape.

Every function that decodes host-controlled bytes (user-data layers, #cloud-config, the write_files
fields, initdata, ISO9660 images) is driven with random and mutated inputs; each call must return
or raise an `AgentError` subclass (exit 78 or 69), never anything else (which would end as exit 70,
"internal error", and a systemd restart into the same input).

Budget and profile: tests/fuzzing.py (shared with test_fuzz_http.py).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import gzip
import io
import json
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from guest_agent import codec, initdata, iso9660, safetoml, safeyaml, userdata
from guest_agent.config import Config
from guest_agent.errors import AgentError, UserDataInvalid
from tests import caa
from tests.fuzzing import EDITS, FUZZ, mutate, only_agent_errors

CFG = Config()
STRICT = dataclasses.replace(CFG, files=dataclasses.replace(CFG.files, strict=True))
YAML_ALPHABET = st.sampled_from([*"[]{}:,-?&*!|>'\"#%@`~ \n\t\\/.0123456789abexyz<=+_", "!!", "<<", "---", "..."])
YAML_TEXT = st.lists(YAML_ALPHABET, max_size=200).map("".join)
CAA_DOC = caa.cloud_config(initdata=caa.initdata_toml())
TOML_PIECES = [*list("[]{}=,.\"'#\n \\0123456789abcdefxo+-_:TZ"), '"""', "'''", "inf", "nan"]
TOML_ALPHABET = st.sampled_from(TOML_PIECES)
TOML_TEXT = st.lists(TOML_ALPHABET, max_size=200).map("".join)


# --- user-data layers ------------------------------------------------------------------------


def _layers(data: bytes, layers: list[str]) -> bytes:
    for layer in layers:
        data = base64.b64encode(data) if layer == "b64" else gzip.compress(data, mtime=0)
    return data


@FUZZ
@given(st.text(min_size=1, max_size=300), st.lists(st.sampled_from(["b64", "gz"]), max_size=6), st.integers(0, 6))
def test_unwrap_layers(text: str, layers: list[str], max_layers: int) -> None:
    """Text under up to max_layers layers comes out whole; one layer more is refused."""
    data = text.encode()
    wrapped = _layers(data, layers)
    if codec.looks_like_base64(data):
        only_agent_errors(lambda: codec.unwrap_layers(wrapped, limit=1 << 16, what="x", max_layers=max_layers))
    elif len(layers) <= max_layers:
        assert codec.unwrap_layers(wrapped, limit=1 << 16, what="x", max_layers=max_layers) == data
    else:
        with pytest.raises(AgentError, match="too many encoding layers"):
            codec.unwrap_layers(wrapped, limit=1 << 16, what="x", max_layers=max_layers)


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 6))
def test_unwrap_layers_random(data: bytes, max_layers: int) -> None:
    only_agent_errors(lambda: codec.unwrap_layers(data, limit=256, what="x", max_layers=max_layers))


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_random_bytes(raw: bytes) -> None:
    only_agent_errors(lambda: userdata.decode(raw, CFG))


@FUZZ
@given(EDITS, st.lists(st.sampled_from(["b64", "gz"]), max_size=2))
def test_gzip_and_base64_mutated(edits: list[tuple[int, int, bytes]], layers: list[str]) -> None:
    raw = mutate(_layers(b"write_files: []\n", layers), edits)
    only_agent_errors(lambda: userdata.plan(raw, CFG))


@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=5), st.binary(max_size=8))
def test_multi_member_gzip(members: list[bytes], tail: bytes) -> None:
    joined = b"".join(gzip.compress(m, mtime=0) for m in members)
    assert codec.gunzip_bounded(joined, limit=1 << 16, what="x") == b"".join(members)
    only_agent_errors(lambda: codec.gunzip_bounded(joined + tail, limit=100, what="x"))


# --- base64 text (codec) and YAML 1.1 ints (safeyaml) -----------------------------------------

B64_BYTES = st.lists(
    st.sampled_from([*(bytes([c]) for c in b"AZaz09+/= \t\n\r\x0b\x0c-_.*\x00\x85\xff"), b"==", b"QUJD", b"QQ=="]),
    max_size=24,
).map(b"".join)


@FUZZ
@given(B64_BYTES, st.sampled_from([None, 0, 1, 3, 6, 100]))
def test_b64_strict_agrees_with_base64_module(data: bytes, limit: int | None) -> None:
    stripped = re.sub(rb"\s+", b"", data)
    try:
        want: bytes | str = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        want = "invalid"
    if limit is not None and (len(stripped) + 3) // 4 * 3 - stripped[-2:].count(b"=") > limit:
        want = "too large"
    try:
        got: bytes | str = codec.b64decode_strict(data, what="x", limit=limit)
    except UserDataInvalid as exc:
        got = "too large" if "size limit" in exc.reason else "invalid"
    assert got == want, data
    looks = len(stripped) >= 4 and len(stripped) % 4 == 0 and re.fullmatch(rb"[A-Za-z0-9+/=\s]+", data) is not None
    assert codec.looks_like_base64(data) == looks, data


@FUZZ
@given(
    st.text(st.sampled_from("+-0178_9abxoBXfF \u0663"), max_size=9),
    st.booleans(),
    st.sampled_from([None, safeyaml.INT]),
)
def test_uint_agrees_with_regexes(value: str, plain: bool, tag: str | None) -> None:
    """safeyaml.uint against the YAML 1.1 int and octal-string regexes it was written with."""
    node = safeyaml.Scalar(value, tag, plain and tag is None, 1)
    v = value.strip()
    if value in ("", "~") and plain and tag is None:
        want: int | str | None = None
    elif node.plain or tag == safeyaml.INT:
        ok = re.fullmatch(r"[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0[0-7_]+|0|[1-9][0-9_]*)", v)
        want = "refused" if ok is None or v.lstrip("+-").replace("_", "") in ("0b", "0x") else "int"
    else:
        want = "int" if re.fullmatch(r"(?:0o)?[0-7]{1,6}", v) else "refused"
    try:
        got = safeyaml.uint(node, "x", octal_strings=True)
    except UserDataInvalid:
        assert want == "refused", value
        return
    if want == "int":
        assert isinstance(got, int), value
    else:
        assert got == want, value


# --- #cloud-config ---------------------------------------------------------------------------


def _texts(node: safeyaml.Node | None, leaf: Callable[[safeyaml.Scalar], object] = lambda s: s.value) -> object:
    """A composed tree with each scalar as `leaf` of it, its text by default (no stack: a loop
    over an explicit worklist)."""
    root: list[object] = [None]
    work: list[tuple[safeyaml.Node | None, list[object] | dict[str, object], int | str]] = [(node, root, 0)]
    while work:
        n, parent, slot = work.pop()
        if isinstance(n, safeyaml.Scalar) or n is None:
            value: object = None if n is None else leaf(n)
        elif isinstance(n, list):
            value = [None] * len(n)
            work.extend((child, value, i) for i, child in enumerate(n))
        else:
            value = dict.fromkeys(n)
            work.extend((child, value, k) for k, child in n.items())
        parent[slot] = value  # type: ignore[index]
    return root[0]


TREES = st.recursive(
    st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(TREES, st.sampled_from([None, True, False]))
def test_compose_agrees_with_pyyaml(tree: object, flow: bool | None) -> None:
    """Differential: any string tree PyYAML dumps is composed to the same structure and texts."""
    import yaml

    text = yaml.safe_dump(tree, default_flow_style=flow, allow_unicode=True)
    try:
        composed = safeyaml.compose(text)
    except AgentError as exc:  # only the limits may refuse what PyYAML reads
        assert "nested too deeply" in exc.reason or "too many" in exc.reason
        return
    assert _texts(composed) == yaml.safe_load(text)


def _composed(text: str) -> object:
    """The composed tree, scalars as (text, tag, plain) (the parsers place the marks of empty
    scalars on different lines), or the refusal's reason."""
    try:
        return _texts(safeyaml.compose(text), lambda s: (s.value, s.tag, s.plain))
    except UserDataInvalid as exc:
        return exc.reason


@FUZZ
@given(st.one_of(YAML_TEXT, EDITS.map(lambda edits: mutate(CAA_DOC, edits).decode("utf-8", "replace"))))
def test_pure_python_parser_composes_the_same(text: str) -> None:
    """Without libyaml (PyYAML built without it) the composer is fed by PyYAML's own parser: only
    the agent's errors, and where both parsers read the document, the same tree.  (They disagree
    on some tabs and tag spellings, so one may refuse what the other reads.)"""
    with_libyaml = _composed(text)
    loader = safeyaml._LOADER
    safeyaml._LOADER = yaml.SafeLoader
    try:
        pure = _composed(text)
    finally:
        safeyaml._LOADER = loader
    if not isinstance(with_libyaml, str) and not isinstance(pure, str):
        assert pure == with_libyaml, text


@FUZZ
@given(YAML_TEXT)
def test_cloud_config_yaml_soup(text: str) -> None:
    only_agent_errors(lambda: userdata.plan(text.encode(), CFG))


@FUZZ
@given(YAML_TEXT, st.sampled_from(["path", "content", "encoding", "permissions", "owner"]))
def test_cloud_config_field_values(value: str, key: str) -> None:
    other = {"path": "/run/peerpod/auth.json", "content": "x"}
    other.pop(key, None)
    lines = [f"    {k}: {v}" for k, v in other.items()] + [f"    {key}: {value}"]
    doc = "write_files:\n  - " + "\n".join(lines)[4:] + "\n"
    only_agent_errors(lambda: userdata.plan(doc.encode(), CFG))


@FUZZ
@given(st.text(max_size=40), st.sampled_from(["permissions", "owner", "path", "encoding"]))
def test_owner_and_permissions_any_string(value: str, key: str) -> None:
    """Any Unicode string, as a JSON (= YAML double-quoted) scalar and as a plain one."""
    for rendered in (json.dumps(value), value.replace("\n", " ")):
        doc = f"write_files:\n  - path: /run/peerpod/auth.json\n    content: x\n    {key}: {rendered}\n"
        if key == "path":
            doc = f"write_files:\n  - path: {rendered}\n"
        only_agent_errors(lambda d=doc: userdata.plan(d.encode(), CFG))


@FUZZ
@given(st.one_of(st.integers(), st.floats(), st.booleans(), st.none()), st.booleans())
def test_permissions_numbers(value: object, tagged: bool) -> None:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    doc = f"write_files:\n  - path: /run/peerpod/auth.json\n    permissions: {'!!int ' if tagged else ''}{text}\n"
    only_agent_errors(lambda: userdata.plan(doc.encode(), CFG))


@FUZZ
@given(EDITS, st.booleans())
def test_caa_document_mutated(edits: list[tuple[int, int, bytes]], strict: bool) -> None:
    raw = mutate(CAA_DOC, edits)
    only_agent_errors(lambda: userdata.plan(raw, STRICT if strict else CFG))


# --- initdata --------------------------------------------------------------------------------


@FUZZ
@given(TOML_TEXT, st.booleans())
def test_initdata_toml_soup(text: str, strict: bool) -> None:
    only_agent_errors(lambda: initdata.parse(text.encode(), strict=strict))


@FUZZ
@given(EDITS)
def test_initdata_toml_mutated(edits: list[tuple[int, int, bytes]]) -> None:
    only_agent_errors(lambda: initdata.parse(mutate(caa.initdata_toml(), edits)))


@FUZZ
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=4))
def test_initdata_data_names(data: dict[str, str]) -> None:
    body = "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in data.items())
    toml = f'algorithm = "sha256"\n[data]\n{body}'.encode()
    only_agent_errors(lambda: initdata.parse(toml))


@FUZZ
@given(EDITS)
def test_initdata_file_mutated(edits: list[tuple[int, int, bytes]]) -> None:
    raw = mutate(initdata.encode_file(caa.initdata_toml()), edits)
    only_agent_errors(lambda: initdata.parse(initdata.decode_file(raw, limit=1 << 16)))


def _significant_with_regexes(text: str) -> list[str]:
    """initdata._significant as it was written with regexes (before the boot path stopped importing re)."""
    special = re.compile(r"[\"'#\[\]{}=,.\n]")
    bodies = {
        '"': re.compile(r'(?:[^"\\\n]|\\[^\n])*'),
        "'": re.compile(r"[^'\n]*"),
        '"""': re.compile(r'(?:[^"\\]|\\.|"(?!""))*', re.S),
    }
    out, pos = [], 0
    while (m := special.search(text, pos)) is not None:
        c, pos = m.group(), m.end()
        out.append(c)
        if c == "#":
            nl = text.find("\n", pos)
            pos = len(text) if nl < 0 else nl + 1
        elif c in "\"'":
            q, start = c, m.start()
            if text.startswith(q * 3, start):
                if q == "'":
                    j = text.find("'''", start + 3)
                else:
                    end = bodies['"""'].match(text, start + 3).end()  # type: ignore[union-attr]
                    j = end if text.startswith(q * 3, end) else -1
                pos = len(text) if j < 0 else j + 3
                while j >= 0 and pos < j + 5 and text.startswith(q, pos):
                    pos += 1
            else:
                end = bodies[q].match(text, start + 1).end()  # type: ignore[union-attr]
                pos = end + 1 if text.startswith(q, end) else end
    return out


# Mostly string delimiters and escapes: where the scanners that replaced the regexes can go wrong.
STRUCTURE_PIECES = ['"""', "'''", '"', "'", "\\", '\\"', '\\"""', "\\\n", "\n", "a", " ", "#", ".", "[", "]", "="]
STRUCTURE_TEXT = st.one_of(
    st.lists(st.sampled_from(STRUCTURE_PIECES), max_size=24),
    st.lists(st.sampled_from([*TOML_PIECES, "\\", "\\\\", '\\"', "\\\n", '""""', "''''", "a.b.c"]), max_size=80),
).map("".join)


@FUZZ
@given(STRUCTURE_TEXT)
@example('a = """\\""" x"""\n[b]')  # an escaped quote starts a run of three
@example('a = "x\\"y" [b]\n"c\\\n" [d]')  # an escaped closing quote; a backslash before a newline
@example("a = '''x'''' [b]\n'''''y''''' [c]")  # up to two quotes beyond the closing three
@example('a = """x\\')  # a backslash at the very end
@example('a = "x\\')
def test_structure_scan_agrees_with_regexes(text: str) -> None:
    assert list(initdata._significant(text)) == _significant_with_regexes(text), text


@FUZZ
@given(EDITS)
def test_structure_scan_agrees_on_mutated_initdata(edits: list[tuple[int, int, bytes]]) -> None:
    text = mutate(caa.initdata_toml(), edits).decode("utf-8", "replace")
    assert list(initdata._significant(text)) == _significant_with_regexes(text), text


# --- safetoml: tomllib with one error ----------------------------------------------------------


def _toml_agrees(text: str) -> None:
    """`safetoml.loads` gives what tomllib reads, or a DecodeError with tomllib's message for
    every refusal (tomllib's ValueError and RecursionError too)."""
    try:
        want: dict[str, object] | None = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        want, refusal = None, str(exc)
    try:
        got: dict[str, object] | None = safetoml.loads(text)
    except safetoml.DecodeError as exc:
        assert want is None and str(exc) == refusal, text
        got = None
    assert json.dumps(got, default=repr) == json.dumps(want, default=repr), text  # dates: by repr


TQ, DQ = "'''", '"""'
TOML_KEYS = ["a", "b", "a-b", "_1", "1", '"a"', "'a'", '"a.b"', '""', "''", "a.b", '"\\u0041"', '"\\n"', "\u00e9", '"a']
TOML_VALUES = [
    *('"x"', "'x'", '"x\\"y"', '"\\\\"', '"\\t"', '"\\q"', '"\\u00e9"', '"a\tb"', "'a\\b'", '"\u00e9\U0001f600"'),
    *(f"{TQ}\nabc\n{TQ}", f"{TQ}a{TQ}'", f"{TQ}'a{TQ}", f'{DQ}\nab"c\n{DQ}', f"{DQ}a\\\nb{DQ}", f'{DQ}"a{DQ}'),
    *("1", "-0", "+5", "01", "1.5", "-0.0", "1.", ".5", "1e5", "1_000", "0x1F", "12345678901234567890", "1" * 5000),
    *("true", "false", "True", "[]", "[ ]", "[1, 2]", "[1,]", "[,]", "[\"a\", 'b']", "[[1]]", "[1 2]", "[1,\n2]"),
    *("{}", "{a = 1}", "1979-05-27", "07:32:00", "inf", "nan", '"unterminated', "'a' 'b'", "", '"\u00a0"', "'\x7f'"),
    *(f"{TQ}{TQ}", f"{TQ}\n{TQ}", f"{DQ}{DQ}", "['''a''']", "[-0.0, +1, 'x\"']", '"a\\"'),
]
TOML_LINE = st.one_of(
    st.tuples(
        st.sampled_from(["", " ", "\t"]),
        st.sampled_from(TOML_KEYS),
        st.sampled_from([" = ", "=", " =", "\t=\t", " ", " == "]),
        st.sampled_from(TOML_VALUES),
        st.sampled_from(["", " ", " # c", "#c", " x", "\t", " # \u00e9\x01"]),
    ).map("".join),
    st.sampled_from(["[t]", "[ t ]", '["t x"]', "[t.u]", "[[t]]", "[a]", "[]", "[t] # c", "[t]x", '[""]', "[data]"]),
    st.sampled_from(["", "# comment", "   ", "\t# c", "\r", "\ufeff", "=", "#\x00"]),
)
TOML_DOC = st.tuples(st.lists(TOML_LINE, max_size=12), st.sampled_from(["", "\n", "\r\n"])).map(
    lambda t: "\n".join(t[0]) + t[1]
)


@FUZZ
@given(TOML_DOC)
def test_safetoml_agrees_on_line_soup(text: str) -> None:
    _toml_agrees(text)


@FUZZ
@given(TOML_TEXT)
def test_safetoml_agrees_on_char_soup(text: str) -> None:
    _toml_agrees(text)


@FUZZ
@given(EDITS)
def test_safetoml_agrees_on_mutated_initdata(edits: list[tuple[int, int, bytes]]) -> None:
    try:
        text = mutate(caa.initdata_toml(), edits).decode()
    except UnicodeDecodeError:
        return
    _toml_agrees(text)


# --- ISO9660 ---------------------------------------------------------------------------------


def _genisoimage(files: dict[str, bytes], label: str) -> bytes:
    tool = shutil.which("genisoimage")
    if tool is None:
        pytest.skip("genisoimage is not installed")
    with tempfile.TemporaryDirectory() as d:
        for name, content in files.items():
            (Path(d) / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(d) / "src" / name).write_bytes(content)
        out = Path(d) / "seed.iso"
        subprocess.run([tool, "-quiet", "-o", str(out), "-V", label, "-J", "-r", str(Path(d) / "src")], check=True)
        return out.read_bytes()


@pytest.fixture(scope="module")
def seed_iso() -> bytes:
    return _genisoimage({"user-data": b"write_files: []\n", "meta-data": b"instance-id: x\n"}, "cidata")


@pytest.fixture(scope="module")
def config_drive_iso() -> bytes:
    """An OpenStack config drive: the file sits three directories down."""
    files = {f"openstack/{v}/{n}": b"{}" for v in ("2012-08-10", "latest") for n in ("meta_data.json", "user_data")}
    return _genisoimage(files, "config-2")


def _read_iso(image: bytes) -> None:
    f = io.BytesIO(image)
    only_agent_errors(lambda: iso9660.volume_label(f))
    only_agent_errors(lambda: iso9660.read_file(f, "user-data", limit=4096))
    only_agent_errors(lambda: iso9660.read_file(f, "openstack/latest/user_data", limit=4096))


@FUZZ
@given(st.binary(max_size=4096), st.integers(0, 40))
def test_iso_random(data: bytes, at_sector: int) -> None:
    _read_iso(bytes(at_sector * iso9660.SECTOR) + data)


ISO_EDITS = st.lists(st.tuples(st.integers(16 * 2048, 24 * 2048), st.integers(0, 4), st.binary(max_size=4)), max_size=8)


@FUZZ
@given(edits=ISO_EDITS)
def test_iso_mutated(seed_iso: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    _read_iso(_edited(seed_iso, edits))


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(16 * 2048, 40 * 2048), st.integers(0, 4), st.binary(max_size=4)), max_size=8)
)
def test_config_drive_mutated(config_drive_iso: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    _read_iso(_edited(config_drive_iso, edits))


def _edited(seed: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    image = bytearray(seed)
    for pos, delete, insert in edits:  # overwrite in place: offsets stay meaningful
        image[pos : pos + max(delete, len(insert))] = insert.ljust(max(delete, len(insert)), b"\xff")
    return bytes(image)


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "9" * 5000 + "\n",  # tomllib: ValueError from int() past 4300 digits
        "x = " + "{a = " * 2000 + "1" + "}" * 2000 + "\n",  # tomllib: RecursionError
        "a = [\n",  # tomllib: TOMLDecodeError
    ],
)
def test_safetoml_every_refusal_is_a_decode_error(text: str) -> None:
    """Callers (config, initdata) catch one exception for every document tomllib refuses."""
    with pytest.raises(safetoml.DecodeError):
        safetoml.loads(text)

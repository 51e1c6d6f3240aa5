"""Property-based fuzzing of the user-data decoders: only the agent's own errors may escape.

Every function that decodes host-controlled bytes (user-data layers, #cloud-config, the write_files
fields, initdata, ISO9660 images) is driven with random and mutated inputs; each call must return
or raise an `AgentError` subclass (exit 78 or 69), never anything else (which would end as exit 70,
"internal error", and a systemd restart into the same input).

Budget and profile: tests/fuzzing.py (shared with test_fuzz_http.py).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import io
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_agent import codec, initdata, iso9660, safeyaml, userdata
from guest_agent.config import Config
from guest_agent.errors import AgentError
from tests import caa
from tests.fuzzing import EDITS, FUZZ, mutate, only_agent_errors

CFG = Config()
STRICT = dataclasses.replace(CFG, files=dataclasses.replace(CFG.files, strict=True))
YAML_ALPHABET = st.sampled_from([*"[]{}:,-?&*!|>'\"#%@`~ \n\t\\/.0123456789abexyz<=+_", "!!", "<<", "---", "..."])
YAML_TEXT = st.lists(YAML_ALPHABET, max_size=200).map("".join)
CAA_DOC = caa.cloud_config(initdata=caa.initdata_toml())
TOML_ALPHABET = st.sampled_from([*list("[]{}=,.\"'#\n \\0123456789abcdefxo+-_:TZ"), '"""', "'''", "inf", "nan"])
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


# --- #cloud-config ---------------------------------------------------------------------------


def _texts(node: safeyaml.Node | None) -> object:
    """A composed tree with each scalar as its text (no stack: a loop over an explicit worklist)."""
    root: list[object] = [None]
    work: list[tuple[safeyaml.Node | None, list[object] | dict[str, object], int | str]] = [(node, root, 0)]
    while work:
        n, parent, slot = work.pop()
        if isinstance(n, safeyaml.Scalar) or n is None:
            value: object = None if n is None else n.value
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


# --- ISO9660 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_iso() -> bytes:
    tool = shutil.which("genisoimage")
    if tool is None:
        pytest.skip("genisoimage is not installed")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "src").mkdir()
        (Path(d) / "src/user-data").write_bytes(b"write_files: []\n")
        (Path(d) / "src/meta-data").write_bytes(b"instance-id: x\n")
        out = Path(d) / "seed.iso"
        subprocess.run([tool, "-quiet", "-o", str(out), "-V", "cidata", "-J", "-r", str(Path(d) / "src")], check=True)
        return out.read_bytes()


def _read_iso(image: bytes) -> None:
    f = io.BytesIO(image)
    only_agent_errors(lambda: iso9660.volume_label(f))
    only_agent_errors(lambda: iso9660.read_root_file(f, "user-data", limit=4096))


@FUZZ
@given(st.binary(max_size=4096), st.integers(0, 40))
def test_iso_random(data: bytes, at_sector: int) -> None:
    _read_iso(bytes(at_sector * iso9660.SECTOR) + data)


ISO_EDITS = st.lists(st.tuples(st.integers(16 * 2048, 24 * 2048), st.integers(0, 4), st.binary(max_size=4)), max_size=8)


@FUZZ
@given(edits=ISO_EDITS)
def test_iso_mutated(seed_iso: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    image = bytearray(seed_iso)
    for pos, delete, insert in edits:  # overwrite in place: offsets stay meaningful
        image[pos : pos + max(delete, len(insert))] = insert.ljust(max(delete, len(insert)), b"\xff")
    _read_iso(bytes(image))

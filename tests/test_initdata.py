from __future__ import annotations

import base64
import gzip
import hashlib

import pytest

from guest_agent import initdata
from guest_agent.errors import UserDataInvalid

LIMIT = 1 << 20

# Small hand-written contents (not CAA's fixtures). The newline right after each opening '''
# is trimmed by TOML, so each value starts at its first real line.
AA = '[token_configs.kbs]\nurl = "http://127.0.0.1:8080"\n'
CDH = (
    'socket = "unix:///run/confidential-containers/cdh.sock"\n\n[kbc]\nname = "cc_kbc"\nurl = "http://127.0.0.1:8080"\n'
)
POLICY = "package agent_policy\n\ndefault CreateContainerRequest := true\ndefault ExecProcessRequest := false\n"


def make_toml(algorithm: str = "sha384", data: str | None = None) -> bytes:
    if data is None:
        data = f"\"aa.toml\" = '''\n{AA}'''\n\"cdh.toml\" = '''\n{CDH}'''\n\"policy.rego\" = '''\n{POLICY}'''\n"
    return f'algorithm = "{algorithm}"\nversion = "0.1.0"\n\n[data]\n{data}'.encode()


def test_default_initdata_digest() -> None:
    assert not initdata.DEFAULT_INITDATA_TOML.endswith(b"\n")
    assert (
        hashlib.sha256(initdata.DEFAULT_INITDATA_TOML).hexdigest()
        == "adb48cc14fea9403d3d51f3b5f5068fd4d80445a14e94f1b3d5dbabaad66478d"
    )
    parsed = initdata.parse(initdata.DEFAULT_INITDATA_TOML)
    assert parsed.algorithm == "sha256"
    assert parsed.version == "0.1.0"
    assert parsed.digest_hex == "adb48cc14fea9403d3d51f3b5f5068fd4d80445a14e94f1b3d5dbabaad66478d"
    # '''\n''' is an empty string: the newline after the opening quotes is trimmed (CAA: aa.toml exists, empty)
    assert parsed.files == (("aa.toml", b""),)
    assert parsed.pcr_extend_value == parsed.digest


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_round_trip_gzip_base64(algorithm: str) -> None:
    toml = make_toml(algorithm)
    raw = base64.b64encode(gzip.compress(toml)) + b"\n"  # as user-data's YAML block scalar delivers it
    assert initdata.decode_file(raw, limit=LIMIT) == toml
    parsed = initdata.parse(initdata.decode_file(raw, limit=LIMIT))
    assert parsed.algorithm == algorithm
    assert parsed.digest == hashlib.new(algorithm, toml).digest()
    assert parsed.digest_hex == hashlib.new(algorithm, toml).hexdigest()
    assert parsed.pcr_extend_value == hashlib.new(algorithm, toml).digest()[:32]
    assert parsed.files == (
        ("aa.toml", AA.encode()),
        ("cdh.toml", CDH.encode()),
        ("policy.rego", POLICY.encode()),
    )


def test_base64_tolerates_line_breaks_and_encode_file_round_trips() -> None:
    toml = make_toml()
    encoded = initdata.encode_file(toml)
    assert b"\n" not in encoded
    assert encoded == initdata.encode_file(toml)  # deterministic (gzip mtime 0)
    wrapped = b"\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + b"\r\n"
    assert initdata.decode_file(wrapped, limit=LIMIT) == toml
    assert gzip.decompress(base64.b64decode(encoded)) == toml


def test_multiline_literal_keeps_inner_newlines() -> None:
    parsed = initdata.parse(make_toml(data="\"aa.toml\" = '''\n\n[a]\nb = 'c'\n'''\n"))
    assert parsed.files == (("aa.toml", b"\n[a]\nb = 'c'\n"),)


def test_non_ascii_content_is_utf8() -> None:
    parsed = initdata.parse(make_toml(data="\"policy.rego\" = '''\n# caf\u00e9\n'''\n"))
    assert parsed.files == (("policy.rego", "# caf\u00e9\n".encode()),)


def test_missing_data_and_unknown_keys() -> None:
    toml = b'algorithm = "sha512"\nversion = "0.1.0"\nextra = 1\n[other]\nx = 2\n'
    parsed = initdata.parse(toml)
    assert parsed.files == ()
    assert parsed.digest == hashlib.sha512(toml).digest()


def test_caa_sha384_pcr_vector() -> None:
    digest = bytes.fromhex(
        "52af3178dd7ad4bf551e629b84b45bfd1fbe1434b980120267181ae3575ea20ca9013b8eadf31d27eed7ff2552d500ef"
    )
    pcr = initdata.expected_pcr(bytes(32), digest[:32])
    assert pcr.hex() == "b38927609998047b40609a152e8ccb3716450321203fe11c1e0533c648334ed5"
    with pytest.raises(ValueError):
        initdata.expected_pcr(bytes(32), digest)


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        (make_toml("md5"), "'md5' is not supported"),
        (make_toml("SHA256"), "'SHA256' is not supported"),
        (b'version = "0.1.0"\n', "is not supported"),
        (b"algorithm = 256\n", "'int' is not supported"),
        (make_toml(data="\"../x\" = '''\nx\n'''\n"), "not allowed: '../x'"),
        (make_toml(data="\"a/b\" = ''\n"), "not allowed: 'a/b'"),
        (make_toml(data="\"..\" = ''\n"), "not allowed: '..'"),
        (make_toml(data="\"a\\nb\" = ''\n"), "not allowed: 'a\\\\nb'"),
        (make_toml(data=f"\"{'n' * 256}\" = ''\n"), "not allowed"),
        (make_toml(data='"x" = 1\n'), "is not a string"),
        (b"a = " + b"[" * 40 + b"]" * 40, "nested too deeply"),
        (b"a = " + b"{b=" * 40 + b"1" + b"}" * 40, "nested too deeply"),
        (b"a = " + b"[" * 5000, "nested too deeply"),
        (b"a = [[[[" + b'"]]]", ' * 2000 + b"]]]]", "is not supported"),  # brackets in strings do not count
        (b'a = [ """x"""" , ' + b"[" * 5000, "nested too deeply"),  # a closing """ may carry 2 more quotes
        (b"a = " + b"1" * 5000, "not valid TOML"),  # int() past Python's 4300-digit limit
        (b"a." * 400_000 + b"b = 1\n", "nested too deeply"),  # tomllib is quadratic in a dotted key
        (b"[" + b"a." * 400_000 + b"b]\n", "nested too deeply"),
        (b"".join(b"k%d = 1\n" % i for i in range(10_001)), "too many lines, keys and values"),
        (b"x = [" + b"1," * 20_000 + b"]\n", "too many lines, keys and values"),
        (b"a = 0x" + b"f" * 5000, "is not supported"),  # hex ints have no digit limit: parsed, then ignored
        (make_toml(data="\"./aa.toml\" = ''\n"), "not allowed: './aa.toml'"),
        (make_toml(data='"aa.toml" = 1\n'), "is not a string"),
        (make_toml(data='"aa.toml" = ["x"]\n'), "is not a string"),
        (make_toml(data='"aa.toml" = { a = "b" }\n'), "is not a string"),
        (b'algorithm = "sha256"\ndata = "x"\n', "is not a table"),
        (b'algorithm = "sha256"\nversion = 1\n', "version is not a string"),
        (b'algorithm = "sha256"\nversion = \n', "not valid TOML"),
        (b'algorithm = "sha256"\nalgorithm = "sha256"\n', "not valid TOML"),
        (b'algorithm = "sha256"\n# \xff\xfe\n', "not valid UTF-8"),
    ],
)
def test_parse_rejects(toml: bytes, fragment: str) -> None:
    with pytest.raises(UserDataInvalid) as info:
        initdata.parse(toml)
    assert fragment in info.value.reason
    assert info.value.exit_code == 78
    assert len(info.value.describe()) < 300


def test_unknown_plain_names_are_skipped_unless_strict() -> None:
    toml = make_toml(data="\"aa.toml\" = 'a'\n\"malicious.rego\" = '''\nx\n'''\n\"kata.toml\" = ''\n")
    parsed = initdata.parse(toml)
    assert parsed.files == (("aa.toml", b"a"),)
    assert parsed.skipped == ("malicious.rego", "kata.toml")
    assert parsed.digest == hashlib.sha384(toml).digest()  # over the whole document, skipped keys included
    with pytest.raises(UserDataInvalid, match=r"not allowed: 'malicious\.rego'"):
        initdata.parse(toml, strict=True)


def test_structure_scan_follows_toml_strings() -> None:
    def nesting_depth(text: str) -> int:
        return initdata.structure(text, max_depth=99)[0]

    assert nesting_depth("a = [[1], [2]]\n[t]\n[[arr]]\n") == 2
    assert nesting_depth('a = \'[[[[\'\nb = "\\"[[["\n# [[[[\n') == 0
    assert nesting_depth("a = '''x''''' \nb = [[1]]") == 2  # '''x''''' is x''
    assert nesting_depth('a = "[[\nb = [[1]]') == 2  # a basic string ends at the newline
    assert nesting_depth('a = """x\\"""[[[\n"""\nb = [[1]]') == 2  # an escaped quote does not close
    assert nesting_depth("a.b.c = 1.5\n") == 2  # dotted keys are nested tables
    assert initdata.structure("a = 1\nb = [1, 2]\n") == (1, 7)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"not base64!\n", "not valid base64"),
        (b"H4sI*AAA\n", "not valid base64"),
        (base64.b64encode(b"algorithm = 'sha256'\n"), "not valid gzip"),
        (base64.b64encode(gzip.compress(b"x" * 100)[:-12]), "truncated"),
        (b"", "truncated"),
    ],
)
def test_decode_rejects(raw: bytes, fragment: str) -> None:
    with pytest.raises(UserDataInvalid) as info:
        initdata.decode_file(raw, limit=LIMIT)
    assert fragment in info.value.reason


def test_gzip_bomb_is_bounded() -> None:
    raw = base64.b64encode(gzip.compress(bytes(10 << 20)))
    assert len(raw) < 20_000
    with pytest.raises(UserDataInvalid) as info:
        initdata.decode_file(raw, limit=LIMIT)
    assert "size limit" in info.value.reason
    # exactly at the limit is fine
    exact = base64.b64encode(gzip.compress(b"#" * LIMIT))
    assert len(initdata.decode_file(exact, limit=LIMIT)) == LIMIT


def test_every_caa_shape_is_within_the_structure_limits() -> None:
    for toml in (make_toml(), initdata.DEFAULT_INITDATA_TOML, make_toml("sha256", data="")):
        depth, items = initdata.structure(toml.decode())
        assert depth <= 2 and items < 30

"""Hostile user-data, initdata and cidata images: every one refused with exit 78 and a short reason.

The classes of the hostile-host issue, as concrete inputs: parser crashes and blow-ups (nested
flow sequences that overflowed libyaml's recursive C loader, alias bombs, chained merge keys, deep
TOML), values outside the agent's error classes (impossible dates, 5000-digit ints, !!float and
!!int on non-numbers, owner values), and the small ones (an oversized body reported as too large,
`max_layers`).  Each case goes through `guest-agent check` and `provision` in-process (exit code,
reason, nothing written) and the worst ones through a child process whose peak RSS (VmHWM of its
own image, read at its end) is asserted < 128 MiB.

Figures from `.venv/bin/python -m tests.test_hostile_userdata` (one child per case; "wall ms" and
"cpu ms" are `userdata.plan()` alone, imports done before the clock starts; "RSS MiB" is the
child's VmHWM, "+parse" its growth over the peak before parsing; a shared,
loaded 2-core machine, so wall times are noisy and only comparable within this one run).  For
contrast, `python -c "import yaml; yaml.load(b'write_files: ' + b'[' * 60000,
Loader=yaml.CSafeLoader)"` (the loader used before) ends with SIGSEGV (exit 139) on the same run.

    case                                       bytes exit  wall ms  cpu ms  RSS MiB  +parse
    (baseline: valid document)                    16    0     0.46    0.45     23.2     1.9
    !!binary content not base64                   74   78     0.54    0.54     23.2     1.9
    !!binary path                                 64   78     0.38    0.38     23.3     2.0
    !!float on a word                             90   78     0.48    0.48     23.3     2.0
    !!float on content                            71   78     0.45    0.45     23.1     1.8
    !!int on a word                               88   78     0.50    0.49     23.3     2.0
    %TAG directive                                59   78     0.36    0.35     23.2     1.9
    1 KB gzip of 1 MB nested flow sequences     1021   78    40.29   33.46     27.4     6.1
    1200 gzip entries off the allow-list        5172   78    80.87   73.21     30.6     9.3
    200k-node flow list                          445   78    63.91   44.23     26.8     5.5
    5000-digit !!int permissions                5085   78     0.55    0.54     23.0     1.7
    5000-digit permissions                      5079   78     4.87    0.91     24.3     3.0
    60 KB nested flow sequences                60013   78     2.52    2.52     24.5     3.2
    8 KB path                                   8232   78     0.59    0.59     23.1     1.9
    NUL in path                                   66   78     0.39    0.39     22.9     1.6
    alias bomb in encoding                       525   78     0.34    0.34     23.2     1.9
    alias without anchor                          84   78     0.51    0.48     23.2     2.0
    anchor on a plain value                       82   78     0.26    0.26     22.9     1.6
    chained merge keys                           917   78     0.43    0.43     23.2     1.9
    complex key                                   21   78     0.28    0.28     22.8     1.5
    duplicate keys                                77   78     0.30    0.30     23.5     2.2
    escape sequences in a key                     21   78     0.23    0.23     23.1     1.8
    five layers                                  128   78     0.18    0.18     23.2     1.9
    gzip bomb                                   8176   78     4.82    4.75     26.2     4.8
    gzip with trailing garbage                    52   78     0.13    0.13     22.6     1.3
    impossible timestamp as content               91   78     0.43    0.43     22.6     1.4
    impossible timestamp as permissions          101   78     0.65    0.65     22.9     1.5
    initdata 300k one-char strings              2604   78    25.67   24.85     27.2     5.9
    initdata 5000-digit int                     1472   78     1.40    1.40     23.4     2.1
    initdata 800 KB dotted key                  2472   78     4.67    4.67     26.7     5.5
    initdata gzip bomb                         10963   78     6.16    6.16     27.3     6.0
    initdata nested arrays                      1564   78     0.81    0.81     23.5     2.2
    initdata nested inline tables               1628   78     1.01    1.01     23.2     1.9
    initdata of 19k empty gzip members          1853   78   105.52  104.56     31.5    10.2
    initdata traversal key                      1496   78     0.61    0.61     23.1     1.8
    local tag on content                          66   78     0.44    0.44     23.4     2.1
    merge key without anchors                     52   78     1.35    0.42     23.3     2.1
    nested block sequences                    100015   78    19.75   19.00     31.5    10.2
    nested flow mappings                      200013   78    30.47   28.78     33.7    12.2
    oversized base64 body                     409600   78     0.11    0.11     22.9     1.3
    oversized invalid base64 content             886   78    30.31   30.03     28.0     6.8
    oversized raw body                        307200   78     0.10    0.10     23.4     1.8
    owner (uid_t)-1                               83   78     0.30    0.30     23.0     1.6
    owner 5000 digits                           5073   78     0.40    0.40     23.3     2.0
    owner alias bomb                             522   78     0.32    0.32     23.1     1.9
    owner superscript two                         75   78     0.39    0.39     22.9     1.6
    owner uid too large                           96   78     0.77    0.72     22.9     1.6
    owner with NUL                                86   78     0.52    0.52     22.8     1.4
    permissions -1                                81   78     0.54    0.54     23.2     1.9
    permissions .inf                              83   78     0.46    0.46     23.1     1.9
    permissions 1e400                             84   78     0.72    0.72     23.0     1.7
    permissions setuid                            84   78     0.65    0.66     23.2     1.9
    plain date as path                            49   78     0.49    0.49     23.2     1.9
    python name tag on path                       64   78     0.71    0.71     23.4     2.1
    python object tag on a list                   50   78     0.23    0.23     22.9     1.5
    traversal                                     68   78     0.49    0.49     23.1     1.8
    two documents                                 37   78     0.45    0.45     23.3     2.1
    unterminated 200 KB quote                 200014   78     5.59    5.36     24.1     2.6

The worst peak (VmHWM) in this run was 30.6 MiB ("1200 gzip entries off the allow-list": ~0.9 MB
of YAML composed, then three 512 KiB entries inflated before the total cap), 9.3 MiB over the
imports; the valid baseline peaks at 23.2 MiB.  By CPU time the slowest rejection is the same case
(~73 ms), then the 200k-node flow list (~44 ms); 19k empty gzip members are decoded in 4 KiB
chunks so the work stays linear.  An *accepted* 1 MiB initdata made only of backslash escapes
costs tomllib ~0.3 s of CPU (linear; `structure()` itself ~5 ms).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from guest_agent import cli, codec, iso9660, safeyaml, userdata
from guest_agent.config import Config
from guest_agent.errors import EXIT_CONFIG, AgentError, UserDataInvalid
from tests import caa

RSS_LIMIT_KIB = 128 * 1024
ENTRY = "write_files:\n  - path: /run/peerpod/auth.json\n    content: x\n"


def entry(**fields: str) -> bytes:
    """One write_files entry with these raw YAML values (path and content defaulted)."""
    values = {"path": "/run/peerpod/auth.json", "content": "x", **fields}
    return ("write_files:\n  - " + "\n    ".join(f"{k}: {v}" for k, v in values.items()) + "\n").encode()


def initdata_doc(toml: bytes) -> bytes:
    return caa.cloud_config(initdata=toml)


def alias_bomb(levels: int = 9, fan: int = 9) -> str:
    lines = ["a0: &a0 [lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return "\n".join(lines)


def merge_chain(levels: int = 25) -> str:
    lines = ["m0: &m0 {k: v}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: v}}")
    return "\n".join(lines)


NESTED_60K = b"write_files: " + b"[" * 60_000
ZEROS = b"encoding: gz+b64, content: " + base64.b64encode(gzip.compress(bytes(512 * 1024), mtime=0))
OVERSIZED_B64 = gzip.compress(entry(encoding="b64", content="'" + "A" * 800_000 + "!'"), mtime=0)

# name -> (user-data as received, a fragment of the reason or its supporting data)
CASES: dict[str, tuple[bytes, str]] = {
    # parser crashes and blow-ups
    "60 KB nested flow sequences": (NESTED_60K, "nested too deeply"),
    "1 KB gzip of 1 MB nested flow sequences": (
        gzip.compress(b"write_files: " + b"[" * 1_000_000, mtime=0),
        "nested too deeply",
    ),
    "nested flow mappings": (b"write_files: " + b"{a: " * 50_000, "nested too deeply"),
    "nested block sequences": (b"write_files:\n" + b"- " * 50_000 + b"x\n", "nested too deeply"),
    "alias bomb in encoding": (
        f"{alias_bomb()}\n{ENTRY}    encoding: *a8\n".encode(),
        "anchors (&name) are not accepted",
    ),
    "alias without anchor": (entry(encoding="*nowhere"), "aliases"),
    "anchor on a plain value": (entry(encoding="&e b64"), "anchors"),
    "chained merge keys": (f"{merge_chain()}\n{ENTRY}".encode(), "anchors"),
    "merge key without anchors": (b"write_files:\n  - <<: {path: /run/peerpod/auth.json}\n", "merge keys"),
    "200k-node flow list": (gzip.compress(b"write_files: [" + b"a," * 200_000 + b"]", mtime=0), "too many YAML nodes"),
    "duplicate keys": (ENTRY.encode() + b"write_files: []\n", "duplicate key"),
    "complex key": (b"? [write_files]\n: []\n", "keys must be scalars"),
    "two documents": (b"write_files: []\n---\nruncmd: [reboot]\n", "more than one YAML document"),
    "unterminated 200 KB quote": (b'write_files: "' + b"x" * 200_000, "not valid YAML"),
    "escape sequences in a key": (b'"\\e[31mred\\u202e": 1\n', "keys the agent refuses"),
    # tags that do not yield the field's type
    "python object tag on a list": (b"write_files: !!python/object/apply:os.system [id]\n", "tag is not accepted"),
    "python name tag on path": (entry(path="!!python/name:os.system x"), "does not give a string"),
    "local tag on content": (entry(content="!foo x"), "does not give a string"),
    "%TAG directive": (b"%TAG !e! tag:example.com,2000:\n---\nwrite_files: !e!list []\n", "tag is not accepted"),
    "impossible timestamp as permissions": (entry(permissions="!!timestamp 2001-02-30"), "octal mode"),
    "impossible timestamp as content": (entry(content="!!timestamp 2001-02-30 25:61:61"), "does not give a string"),
    "plain date as path": (entry(path="2001-02-30"), "must be absolute"),
    "5000-digit permissions": (entry(permissions="1" * 5000), "too long for a number"),
    "5000-digit !!int permissions": (entry(permissions="!!int " + "7" * 5000), "too long for a number"),
    "!!int on a word": (entry(permissions="!!int abc"), "not an integer"),
    "!!float on a word": (entry(permissions="!!float abc"), "octal mode"),
    "!!float on content": (entry(content="!!float abc"), "does not give a string"),
    "permissions .inf": (entry(permissions=".inf"), "not an integer"),
    "permissions 1e400": (entry(permissions="1e400"), "not an integer"),
    "permissions -1": (entry(permissions="-1"), "out of range"),
    "permissions setuid": (entry(permissions="04755"), "out of range"),
    "!!binary content not base64": (entry(content="!!binary '***'"), "not valid base64"),
    "!!binary path": (entry(path="!!binary L3J1bi9wZWVycG9k"), "does not give a string"),
    # owner (refused whatever it is: no CAP_CHOWN in the unit)
    "owner uid too large": (entry(owner="99999999999999999999999"), "owner is not supported"),
    "owner (uid_t)-1": (entry(owner="4294967295"), "owner is not supported"),
    "owner with NUL": (entry(owner='"root\\0:root"'), "owner is not supported"),
    "owner superscript two": (entry(owner="²"), "owner is not supported"),
    "owner 5000 digits": (entry(owner="9" * 5000), "owner is not supported"),
    "owner alias bomb": (f"{alias_bomb()}\n{ENTRY}    owner: *a8\n".encode(), "anchors"),
    # paths
    "NUL in path": (entry(path='"/run/peerpod/auth.json\\0x"'), "control characters"),
    "traversal": (entry(path="/run/peerpod/../../etc/shadow"), "not normalised"),
    "8 KB path": (entry(path="/" + "a" * 8192), "too long"),
    # sizes (the small ones): checked before decoding
    "oversized raw body": (b"#" * (300 * 1024), "larger than the size limit"),
    "oversized base64 body": (base64.b64encode(b"#" * (300 * 1024)), "larger than the size limit"),
    "oversized invalid base64 content": (OVERSIZED_B64, "larger than the size limit"),
    "gzip bomb": (gzip.compress(b"#" * (8 << 20), mtime=0), "decompresses to more than the size limit"),
    "five layers": (
        base64.b64encode(gzip.compress(base64.b64encode(gzip.compress(gzip.compress(b"write_files: []\n"))))),
        "too many encoding layers",
    ),
    "1200 gzip entries off the allow-list": (
        gzip.compress(b"write_files:\n" + b"".join(b"  - {path: /run/x%d, %s}\n" % (i, ZEROS) for i in range(1200))),
        "larger than the size limit in total",
    ),
    "gzip with trailing garbage": (gzip.compress(b"write_files: []\n") + b"\0" * 16, "data after its gzip stream"),
    # initdata
    "initdata nested arrays": (initdata_doc(b"a = " + b"[" * 100_000), "nested too deeply"),
    "initdata nested inline tables": (initdata_doc(b"a = " + b"{b=" * 50_000), "nested too deeply"),
    "initdata 800 KB dotted key": (initdata_doc(b"a." * 400_000 + b"b = 1\n"), "nested too deeply"),
    "initdata 300k one-char strings": (initdata_doc(b"x = [" + b"'a'" * 300_000 + b"]\n"), "too many lines"),
    "initdata 5000-digit int": (initdata_doc(b'algorithm = "sha256"\na = ' + b"1" * 5000), "not valid TOML"),
    "initdata gzip bomb": (
        b"write_files:\n  - path: /run/peerpod/initdata\n    content: "
        + base64.b64encode(gzip.compress(b"#" * (8 << 20), mtime=0))
        + b"\n",
        "decompresses to more than the size limit",
    ),
    "initdata of 19k empty gzip members": (
        gzip.compress(
            b"write_files:\n  - path: /run/peerpod/initdata\n    content: "
            + base64.b64encode(gzip.compress(b"", mtime=0) * 19_000)
            + b"\n"
        ),
        "is not supported",  # decoded whole (linear), to an empty TOML without an algorithm
    ),
    "initdata traversal key": (initdata_doc(caa.initdata_toml(data={"../../etc/shadow": "x"})), "not allowed"),
}

# The worst ones (largest inputs and the ones that crashed or blew up before) run in a child.
WORST = [
    "60 KB nested flow sequences",
    "1 KB gzip of 1 MB nested flow sequences",
    "alias bomb in encoding",
    "chained merge keys",
    "200k-node flow list",
    "oversized invalid base64 content",
    "gzip bomb",
    "initdata nested arrays",
    "initdata 800 KB dotted key",
    "initdata of 19k empty gzip members",
    "initdata gzip bomb",
    "1200 gzip entries off the allow-list",
]


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_a_short_reason(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, fragment = CASES[case]
    with pytest.raises(UserDataInvalid) as ei:
        userdata.plan(raw, Config())
    described = ei.value.describe()
    assert fragment in described
    assert len(described) < 400, described  # no document text beyond a short, escaped prefix
    assert described.isprintable()
    ud = tmp_path / "user-data"
    ud.write_bytes(raw)
    assert cli.main(["check", str(ud)]) == EXIT_CONFIG
    root = tmp_path / "root"
    assert cli.main(["provision", "--root", str(root), "--user-data", str(ud)]) == EXIT_CONFIG  # boot's path
    assert not (root / "run/peerpod").exists()  # nothing written
    err = capsys.readouterr().err
    assert "unexpected internal error" not in err


_CHILD = """
import sys, time
import yaml  # imported before the clock starts: the figures are the parse, not the imports
from guest_agent import cli, userdata
from guest_agent.config import Config
from guest_agent.errors import AgentError
def hwm():
    # VmHWM: the peak RSS of this process image only.  ru_maxrss would also count the image
    # before exec (a vfork of the big pytest process).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
raw = open(sys.argv[1], "rb").read()
before = hwm()
wall, cpu = time.perf_counter(), time.process_time()
try:
    userdata.plan(raw, Config())
except AgentError:
    pass
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
rc = cli.main(["check", sys.argv[1]])
sys.stderr.write("\\nFIGURES %.2f %.2f %d %d\\n" % (wall * 1000, cpu * 1000, before, hwm()))
sys.exit(rc)
"""


@dataclasses.dataclass
class Run:
    rc: int  # exit status, or -signal
    maxrss_kib: int  # the child's peak RSS (VmHWM of its own image)
    before_kib: int  # its peak RSS after the imports, before the input was parsed
    wall_ms: float  # userdata.plan() alone
    cpu_ms: float


def run_child(raw: bytes) -> Run:
    """`userdata.plan` timed, then `guest-agent check`, on raw in a child process."""
    with tempfile.TemporaryDirectory() as d:
        ud, err = Path(d, "user-data"), Path(d, "stderr")
        ud.write_bytes(raw)
        with err.open("wb") as ef:
            p = subprocess.Popen([sys.executable, "-c", _CHILD, str(ud)], stdout=subprocess.DEVNULL, stderr=ef)
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        tail = err.read_text(errors="replace").rsplit("FIGURES ", 1)
        wall, cpu, before, peak = tail[1].split()[:4] if len(tail) == 2 else ("nan", "nan", "0", "0")
    return Run(p.returncode, int(peak) or usage.ru_maxrss, int(before), float(wall), float(cpu))


@pytest.mark.parametrize("case", WORST)
def test_worst_inputs_in_a_child(case: str) -> None:
    run = run_child(CASES[case][0])
    assert run.rc == EXIT_CONFIG, f"exit {run.rc}"  # not 70, not a signal
    assert run.maxrss_kib < RSS_LIMIT_KIB


# --- the small ones, directly ---------------------------------------------------------------


def test_max_layers_means_layers() -> None:
    doc = b"write_files: []\n"
    four = base64.b64encode(gzip.compress(base64.b64encode(gzip.compress(doc))))
    assert codec.unwrap_layers(four, limit=1 << 20, what="x", max_layers=4) == doc
    with pytest.raises(UserDataInvalid, match="too many encoding layers"):
        codec.unwrap_layers(four, limit=1 << 20, what="x", max_layers=3)
    assert codec.unwrap_layers(doc, limit=1 << 20, what="x", max_layers=0) == doc


def test_oversized_is_too_large_not_bad_base64() -> None:
    bad = b"A" * 4000 + b"!!!!"
    with pytest.raises(UserDataInvalid, match="larger than the size limit"):
        codec.b64decode_strict(bad, what="x", limit=1000)
    with pytest.raises(UserDataInvalid, match="not valid base64"):
        codec.b64decode_strict(bad, what="x", limit=4000)
    assert codec.b64decode_strict(base64.b64encode(b"x" * 1000), what="x", limit=1000) == b"x" * 1000
    # The same bound when a base64 layer is peeled by content: exact at the limit, refused one under.
    assert codec.unwrap_layers(base64.b64encode(b"x" * 1000), limit=1000, what="x") == b"x" * 1000
    with pytest.raises(UserDataInvalid, match="larger than the size limit"):
        codec.unwrap_layers(base64.b64encode(b"x" * 1000), limit=999, what="x")


def test_multi_member_gzip_is_decoded_whole_and_bounded() -> None:
    """Go's gzip.Reader (CAA) reads every member: the digest must cover the same bytes."""
    members = gzip.compress(b"algorithm = ", mtime=0) + gzip.compress(b'"sha256"\n', mtime=0)
    assert codec.gunzip_bounded(members, limit=100, what="x") == b'algorithm = "sha256"\n'
    with pytest.raises(UserDataInvalid, match="more than the size limit"):
        codec.gunzip_bounded(members, limit=15, what="x")
    many = gzip.compress(b"", mtime=0) * 10_000 + gzip.compress(b"x" * 200, mtime=0) * 10
    with pytest.raises(UserDataInvalid, match="more than the size limit"):
        codec.gunzip_bounded(many, limit=1000, what="x")
    with pytest.raises(UserDataInvalid, match="truncated"):
        codec.gunzip_bounded(members[:-3], limit=100, what="x")


def _iso(root_extent: int, root_length: int, records: bytes) -> bytes:
    """A minimal ISO9660 image: PVD at sector 16 (label cidata), terminator, root directory at 18."""
    pvd = bytearray(iso9660.SECTOR)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[40:72] = b"cidata".ljust(32)
    root = bytearray(34)
    root[0] = 34
    root[2:6] = root_extent.to_bytes(4, "little")
    root[10:14] = root_length.to_bytes(4, "little")
    root[25] = 2
    root[32] = 1
    pvd[156:190] = root
    term = bytearray(iso9660.SECTOR)
    term[0:7] = b"\xffCD001\x01"
    return bytes(16 * iso9660.SECTOR) + bytes(pvd) + bytes(term) + records.ljust(iso9660.SECTOR, b"\0")


def _record(name: bytes, extent: int, size: int) -> bytes:
    rec = bytearray(33 + len(name) + (1 - len(name) % 2))
    rec[0] = len(rec)
    rec[2:6] = extent.to_bytes(4, "little")
    rec[10:14] = size.to_bytes(4, "little")
    rec[32] = len(name)
    rec[33 : 33 + len(name)] = name
    return bytes(rec)


@pytest.mark.parametrize(
    ("image", "expect"),
    [
        # huge directory: read bounded; the file it names lies past the image's end: refused
        (_iso(18, 0xFFFFFFFF, _record(b"USER_DAT.;1", 0xFFFFFFFF, 10)), "not iso"),
        (_iso(18, 2048, _record(b"USER_DAT.;1", 19, 0xFFFFFFFF)), "too large"),
        (_iso(0xFFFFFFFF, 2048, b""), None),  # root beyond the end of the image
        (_iso(18, 2048, b"\x01" * 2048), None),  # records of length 1
        (b"\0" * (16 * 2048) + b"\x01CD001" + b"\0" * 2042, None),  # a PVD and no terminator
        (b"\0" * 1000, "not iso"),
    ],
)
def test_hostile_iso_images(image: bytes, expect: str | None) -> None:
    import io

    f = io.BytesIO(image)
    try:
        got = iso9660.read_file(f, "user-data", limit=4096)
    except iso9660.TooLarge as exc:
        assert expect == "too large" and exc.exit_code == EXIT_CONFIG
        assert exc.supporting_data["limit_bytes"] == 4096
        return
    except iso9660.NotIso as exc:
        assert expect == "not iso" and isinstance(exc, AgentError)
        return
    assert expect is None and got is None
    assert got in (None, b"")


def main() -> None:
    """Print the figures table for the module docstring."""
    print(f"    {'case':40} {'bytes':>7} {'exit':>4} {'wall ms':>8} {'cpu ms':>7} {'RSS MiB':>8} {'+parse':>7}")
    for case, raw in [("(baseline: valid document)", b"write_files: []\n")] + [(c, CASES[c][0]) for c in sorted(CASES)]:
        r = run_child(raw)
        mib, grow = r.maxrss_kib / 1024, (r.maxrss_kib - r.before_kib) / 1024
        print(f"    {case:40} {len(raw):7} {r.rc:4} {r.wall_ms:8.2f} {r.cpu_ms:7.2f} {mib:8.1f} {grow:7.1f}")


if __name__ == "__main__":
    main()


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_pure_python_parser(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyYAML built without libyaml: its own parser feeds the same bounded composer."""
    monkeypatch.setattr(safeyaml, "_LOADER", yaml.SafeLoader)
    raw, fragment = CASES[case]
    with pytest.raises(UserDataInvalid) as ei:
        userdata.plan(raw, Config())
    assert fragment in ei.value.describe()

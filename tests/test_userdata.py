"""User-data decoding and validation: CAA's shapes accepted, everything else refused."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json
import logging
from pathlib import Path

import pytest

from guest_agent import cli, initdata, userdata
from guest_agent import log as agent_log
from guest_agent.config import Config
from guest_agent.errors import EXIT_CONFIG, UserDataInvalid, field_of, show
from tests import caa
from tests.conftest import snapshot


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("write_files[3].path", "write_files[].path"),
        ("write_files[12].content (!!binary)", "write_files[].content (!!binary)"),
        ("a[x][0][]", "a[x][][]"),
        ("a[\u0663]", "a[]"),  # any Unicode decimal digit, as the index a regex's \d takes
    ],
)
def test_field_of_drops_the_index(where: str, field: str) -> None:
    assert field_of(where) == field


def test_show_is_a_short_ascii_prefix() -> None:
    assert show("abc") == "abc"
    assert show("\u00e9\n" + "x" * 50, 4) == "\\xe9\\nxx..."


def files_of(plan: userdata.Plan) -> dict[str, bytes]:
    return {f.path: f.content for f in plan.files}


def test_caa_template_output_is_written_byte_for_byte(cfg: Config) -> None:
    toml = caa.initdata_toml("sha384")
    raw = caa.cloud_config(initdata=toml)
    plan = userdata.plan(raw, cfg)
    got = files_of(plan)
    for path, content in caa.expected_files(initdata=toml).items():
        assert got[path] == content, path
    assert got["/run/peerpod/aa.toml"] == caa.AA_TOML.encode()
    assert got["/run/peerpod/cdh.toml"] == caa.CDH_TOML.encode()
    assert got["/run/peerpod/policy.rego"] == caa.POLICY_REGO.encode()
    assert got["/run/peerpod/initdata.digest"] == hashlib.sha384(toml).hexdigest().encode()
    assert all(f.mode == 0o600 for f in plan.files if f.path != "/run/peerpod/initdata.digest")


def test_apf_json_keeps_caa_formatting(cfg: Config) -> None:
    got = files_of(userdata.plan(caa.cloud_config(), cfg))
    assert got["/run/peerpod/apf.json"] == caa.apf_json().encode() + b"\n"  # YAML `|`: one trailing newline


def test_without_initdata_the_default_is_used_and_aa_toml_exists(cfg: Config) -> None:
    plan = userdata.plan(caa.cloud_config(initdata=None), cfg)
    got = files_of(plan)
    assert plan.initdata_is_default
    assert got["/run/peerpod/aa.toml"] == b""
    assert got["/run/peerpod/initdata.digest"] == b"adb48cc14fea9403d3d51f3b5f5068fd4d80445a14e94f1b3d5dbabaad66478d"
    assert initdata.decode_file(got["/run/peerpod/initdata"], limit=1 << 20) == initdata.DEFAULT_INITDATA_TOML


def test_initdata_files_win_over_write_files(cfg: Config) -> None:
    extra = "  - path: /run/peerpod/aa.toml\n    content: from-write-files\n"
    got = files_of(userdata.plan(caa.cloud_config(initdata=caa.initdata_toml(), extra_entries=extra), cfg))
    assert got["/run/peerpod/aa.toml"] == caa.AA_TOML.encode()


@pytest.mark.parametrize("layers", ["b64", "gz", "gz+b64", "b64+gz+b64"])
def test_optional_gzip_and_base64_layers(cfg: Config, layers: str) -> None:
    raw = caa.cloud_config()
    for layer in layers.split("+"):
        raw = base64.b64encode(raw) if layer == "b64" else gzip.compress(raw)
    assert files_of(userdata.plan(raw, cfg))["/run/peerpod/apf.json"].startswith(b"{")


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("b64", lambda b: base64.b64encode(b).decode()),
        ("base64", lambda b: base64.b64encode(b).decode()),
        ("gz+b64", lambda b: base64.b64encode(gzip.compress(b)).decode()),
        ("gzip+base64", lambda b: base64.b64encode(gzip.compress(b)).decode()),
        ("text/plain", lambda b: b.decode()),
    ],
)
def test_write_files_encodings(cfg: Config, encoding: str, encode: object) -> None:
    content = b'{"auths": {}}'
    doc = (
        "#cloud-config\nwrite_files:\n"
        f"  - path: /run/peerpod/auth.json\n    encoding: {encoding}\n    content: '{encode(content)}'\n"  # type: ignore[operator]
        "    permissions: '0640'\n"
    )
    spec = next(f for f in userdata.plan(doc.encode(), cfg).files if f.path == "/run/peerpod/auth.json")
    assert spec.content == content
    assert spec.mode == 0o640


def test_binary_tag_content_is_decoded(cfg: Config) -> None:
    """YAML's `!!binary` (base64 with line breaks) gives the file's bytes, as PyYAML's safe_load does."""
    doc = (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/auth.json\n"
        b"    content: !!binary |\n      eyJhdXRo\n      cyI6IHt9fQ==\n"
    )
    spec = next(f for f in userdata.plan(doc, cfg).files if f.path == "/run/peerpod/auth.json")
    assert spec.content == b'{"auths": {}}'


def test_yaml_octal_permissions(cfg: Config) -> None:
    doc = b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/auth.json\n    content: x\n    permissions: 0644\n"
    spec = next(f for f in userdata.plan(doc, cfg).files if f.path == "/run/peerpod/auth.json")
    assert spec.mode == 0o644


@pytest.mark.parametrize(
    "owner",
    ["root:0", "root", "0", "'4294967295'", "4294967295", "'1\\0'", "²", "9" * 5000, "!!int 99", "[a]", "{a: b}"],
)
def test_owner_is_refused_whatever_its_value(cfg: Config, owner: str) -> None:
    """The unit has no CAP_CHOWN and no chown syscalls: refused up front, in check and run alike."""
    doc = f"write_files:\n  - path: /run/peerpod/auth.json\n    content: x\n    owner: {owner}\n".encode()
    with pytest.raises(UserDataInvalid) as ei:
        userdata.plan(doc, cfg)
    assert "owner" in ei.value.reason
    assert len(ei.value.describe()) < 300


def test_null_owner_is_no_owner(cfg: Config) -> None:
    doc = b"write_files:\n  - path: /run/peerpod/auth.json\n    content: x\n    owner:\n"
    spec = next(f for f in userdata.plan(doc, cfg).files if f.path == "/run/peerpod/auth.json")
    assert (spec.uid, spec.gid, spec.mode) == (None, None, 0o600)


def test_cloud_config_line_is_optional(cfg: Config) -> None:
    """CAA's process-user-data needs no header (the line is a YAML comment to yaml.v2)."""
    raw = caa.cloud_config().removeprefix(b"#cloud-config\n")
    assert not raw.startswith(b"#")
    assert files_of(userdata.plan(raw, cfg))["/run/peerpod/apf.json"].startswith(b"{")
    # and without it, base64 around the document is still recognised (CAA's Azure/GCP readers)
    assert files_of(userdata.plan(base64.b64encode(raw), cfg))["/run/peerpod/apf.json"].startswith(b"{")


def test_paths_off_the_allow_list_are_skipped_with_a_warning(cfg: Config, caplog: pytest.LogCaptureFixture) -> None:
    """What older CAA releases sent: logged, counted on the plan, not written; the rest is."""
    extra = (
        "  - path: /run/peerpod/agent-config.toml\n    content: x\n"
        "  - path: /run/peerpod/daemon.json\n    content: '{}'\n"
        "  - path: /run/peerpod/policy.rego\n    content: x\n"
    )
    caplog.set_level(logging.DEBUG, logger=agent_log.ROOT)
    plan = userdata.plan(caa.cloud_config(initdata=caa.initdata_toml(), extra_entries=extra), cfg)
    records = caplog.records
    skipped = ("/run/peerpod/agent-config.toml", "/run/peerpod/daemon.json", "/run/peerpod/policy.rego")
    assert plan.skipped_paths == skipped
    assert plan.skipped == 3
    got = files_of(plan)
    assert "/run/peerpod/agent-config.toml" not in got and "/run/peerpod/daemon.json" not in got
    assert got["/run/peerpod/policy.rego"] == caa.POLICY_REGO.encode()  # from initdata, not write_files
    assert [agent_log.record_fields(r)["GUEST_AGENT_PATH"] for r in records] == list(skipped)
    assert all(r.levelname == "WARNING" for r in records)


def test_unknown_initdata_keys_are_skipped(cfg: Config, caplog: pytest.LogCaptureFixture) -> None:
    toml = caa.initdata_toml(data={"aa.toml": "x", "kata-agent.toml": "y", "image-policy.json": "{}"})
    caplog.set_level(logging.DEBUG, logger=agent_log.ROOT)
    plan = userdata.plan(caa.cloud_config(initdata=toml), cfg)
    records = caplog.records
    assert plan.skipped_initdata_keys == ("kata-agent.toml", "image-policy.json")
    assert "/run/peerpod/kata-agent.toml" not in files_of(plan)
    assert files_of(plan)["/run/peerpod/initdata.digest"] == hashlib.sha384(toml).hexdigest().encode()
    assert [agent_log.record_fields(r)["GUEST_AGENT_INITDATA_KEY"] for r in records if r.levelname == "WARNING"] == [
        "kata-agent.toml",
        "image-policy.json",
    ]


def strict(cfg: Config) -> Config:
    return dataclasses.replace(cfg, files=dataclasses.replace(cfg.files, strict=True))


STRICT_REJECTIONS: dict[str, tuple[bytes, str]] = {
    "initdata unknown key": (
        caa.cloud_config(initdata=caa.initdata_toml(data={"aa.toml": "x", "malicious.rego": "x"})),
        "not allowed",
    ),
}


@pytest.mark.parametrize("case", sorted(STRICT_REJECTIONS))
def test_strict_refuses_what_caa_skips(cfg: Config, case: str) -> None:
    raw, fragment = STRICT_REJECTIONS[case]
    assert userdata.plan(raw, cfg).skipped == 1
    with pytest.raises(UserDataInvalid) as ei:
        userdata.plan(raw, strict(cfg))
    assert fragment in ei.value.describe()


def test_empty_cloud_config_writes_only_initdata_defaults(cfg: Config) -> None:
    plan = userdata.plan(b"#cloud-config\n", cfg)
    assert sorted(files_of(plan)) == [
        "/run/peerpod/aa.toml",
        "/run/peerpod/initdata",
        "/run/peerpod/initdata.digest",
    ]


BOMB = gzip.compress(b"#cloud-config\n" + b" " * (3 * 1024 * 1024))

REJECTIONS: dict[str, tuple[bytes, str]] = {
    "path traversal": (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/../../etc/passwd\n    content: x\n",
        "not normalised",
    ),
    "dot segment": (b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/./apf.json\n    content: x\n", "normalised"),
    "double slash": (b"#cloud-config\nwrite_files:\n  - path: //run/peerpod/apf.json\n    content: x\n", "normalised"),
    "relative path": (b"#cloud-config\nwrite_files:\n  - path: run/peerpod/apf.json\n    content: x\n", "absolute"),
    "runcmd": (caa.cloud_config() + b"runcmd:\n  - [touch, /tmp/pwned]\n", "refuses"),
    "bootcmd only": (b"#cloud-config\nbootcmd: [reboot]\n", "refuses"),
    "unknown entry key": (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: x\n    append: true\n",
        "unsupported keys",
    ),
    "duplicate path": (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: a\n"
        b"  - path: /run/peerpod/apf.json\n    content: b\n",
        "twice",
    ),
    "invalid yaml": (b"#cloud-config\nwrite_files: [\n  - path: {\n", "not valid YAML"),
    "shell script": (b"#!/bin/sh\nreboot\n", "#cloud-config"),
    "include part": (b"#include\nhttp://127.0.0.1/x\n", "#cloud-config"),
    "plain text": (b"hello\n", "mapping"),
    "not utf-8": (b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: \xff\xfe\n", "UTF-8"),
    "oversized": (b"#cloud-config\n#" + b"x" * (300 * 1024) + b"\n", "size limit"),
    "gzip bomb": (BOMB, "size limit"),
    "bad permissions": (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: x\n    permissions: '4755'\n",
        "out of range",
    ),
    "bad encoding": (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: x\n    encoding: rot13\n",
        "encoding",
    ),
    "bad base64 content": (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: '!!!'\n    encoding: b64\n",
        "base64",
    ),
    "owner": (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: x\n    owner: root\n",
        "owner is not supported",
    ),
    "traversal off the allow-list": (b"write_files:\n  - path: /etc/../etc/passwd\n    content: x\n", "normalised"),
    "relative off the allow-list": (b"write_files:\n  - path: etc/passwd\n", "absolute"),
    "control character in path": (b'write_files:\n  - path: "/etc/pass\\nwd"\n', "control"),
    "path as a list": (b"write_files:\n  - path: [/run/peerpod/apf.json]\n", "must be a string"),
    "path as !!int": (b"write_files:\n  - path: !!int 12\n", "does not give a string"),
    "content as mapping": (b"write_files:\n  - path: /run/peerpod/apf.json\n    content: {a: b}\n", "string"),
    "write_files as mapping": (b"write_files: {path: /run/peerpod/apf.json}\n", "must be a list"),
    "list document": (b"#cloud-config\n- a\n- b\n", "mapping"),
    "initdata unknown algorithm": (
        caa.cloud_config(initdata=b'algorithm = "md5"\nversion = "0.1.0"\n[data]\n"aa.toml" = "x"\n'),
        "algorithm",
    ),
    "initdata disallowed name": (
        caa.cloud_config(initdata=caa.initdata_toml(data={"aa.toml": "x", "../../etc/shadow": "x"})),
        "initdata",
    ),
    "initdata not base64": (
        b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/initdata\n    content: '***'\n",
        "base64",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejections_raise_a_reason(cfg: Config, case: str) -> None:
    raw, fragment = REJECTIONS[case]
    with pytest.raises(UserDataInvalid) as ei:
        userdata.plan(raw, cfg)
    assert fragment.lower() in ei.value.describe().lower()


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejections_write_nothing(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`guest-agent provision` exits 78 with a one-line reason and the root is untouched."""
    root = tmp_path / "root"
    (root / "run/peerpod").mkdir(parents=True)
    (root / "run/peerpod/apf.json").write_bytes(b"old")  # a previous boot's file stays as it was
    ud = tmp_path / "user-data"
    ud.write_bytes(REJECTIONS[case][0])
    before = snapshot(root)
    assert cli.main(["provision", "--root", str(root), "--user-data", str(ud)]) == EXIT_CONFIG
    assert snapshot(root) == before
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("guest-agent: error:")]
    assert len(errors) == 1, errors  # one line with the reason


def test_size_limits_come_from_config(cfg: Config) -> None:
    small = dataclasses.replace(cfg, limits=dataclasses.replace(cfg.limits, max_user_data_bytes=100))
    with pytest.raises(UserDataInvalid, match="size limit"):
        userdata.plan(caa.cloud_config(), small)
    # The decoded limit binds a body with no encoding layer too (a config may set it below the raw one).
    doc = caa.cloud_config()

    def decoded_limit(n: int) -> Config:
        return dataclasses.replace(cfg, limits=dataclasses.replace(cfg.limits, max_decoded_bytes=n))

    with pytest.raises(UserDataInvalid, match="size limit") as ei:
        userdata.decode(doc, decoded_limit(len(doc) - 1))
    assert ei.value.supporting_data["limit_bytes"] == len(doc) - 1
    assert userdata.decode(doc, decoded_limit(len(doc))) == doc.decode()


def test_allow_list_comes_from_config(cfg: Config) -> None:
    extended = dataclasses.replace(
        cfg, files=dataclasses.replace(cfg.files, allowed_paths=(*cfg.files.allowed_paths, "/run/peerpod/extra"))
    )
    doc = b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/extra\n    content: x\n"
    assert "/run/peerpod/extra" in files_of(userdata.plan(doc, extended))


def test_skipped_entries_in_check_provision_and_the_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = "  - path: /run/peerpod/daemon.json\n    content: '{}'\n  - path: /etc/motd\n    content: hi\n"
    toml = caa.initdata_toml(data={"aa.toml": "x", "kata-agent.toml": "y"})
    ud = tmp_path / "user-data"
    ud.write_bytes(caa.cloud_config(initdata=toml, extra_entries=extra))
    assert cli.main(["check", str(ud)]) == 0
    out = capsys.readouterr().out
    assert "skipped (not on the allow-list): /run/peerpod/daemon.json" in out
    assert "skipped initdata [data] key: kata-agent.toml" in out
    root = tmp_path / "root"
    assert cli.main(["provision", "--root", str(root), "--user-data", str(ud)]) == 0
    assert not (root / "run/peerpod/daemon.json").exists() and not (root / "etc/motd").exists()
    assert not (root / "run/peerpod/kata-agent.toml").exists()
    assert (root / "run/peerpod/aa.toml").read_bytes() == b"x"
    timeline = json.loads((root / "run/guest-agent/timeline.json").read_text())
    assert timeline["counts"] == {"skipped_entries": 3}


def test_owner_is_refused_by_check_and_provision_alike(tmp_path: Path) -> None:
    ud = tmp_path / "user-data"
    ud.write_bytes(caa.cloud_config(extra_entries="  - path: /run/peerpod/aa.toml\n    content: x\n    owner: root\n"))
    root = tmp_path / "root"
    assert cli.main(["check", str(ud)]) == EXIT_CONFIG
    assert cli.main(["provision", "--root", str(root), "--user-data", str(ud)]) == EXIT_CONFIG
    assert not (root / "run/peerpod/aa.toml").exists()

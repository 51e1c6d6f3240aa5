"""Layered TOML configuration: defaults, /etc file, sorted drop-ins, --config; strict keys and types."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from guest_agent import config, files
from guest_agent.errors import ConfigError


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_document_the_allow_list() -> None:
    cfg = config.load("/nonexistent-root")
    assert cfg.provider == "auto"
    assert "/run/peerpod/apf.json" in cfg.files.allowed_paths
    assert cfg.fetch.deadline_s == 180.0
    assert cfg.files.default_mode == 0o600


def test_layers_apply_in_order(tmp_path: Path) -> None:
    write(tmp_path / "etc/guest-agent/config.toml", 'provider = "aws"\n[fetch]\ndeadline_s = 10\n')
    write(tmp_path / "etc/guest-agent/config.d/20-b.toml", "[fetch]\ndeadline_s = 30\n")
    write(tmp_path / "etc/guest-agent/config.d/10-a.toml", "[fetch]\ndeadline_s = 20\nconnect_timeout_s = 0.5\n")
    write(tmp_path / "etc/guest-agent/config.d/README", "not toml, ignored")
    extra = write(tmp_path / "extra.toml", '[aws]\nimds_url = "http://127.0.0.1:1"\n')
    cfg = config.load(str(tmp_path), str(extra))
    assert cfg.provider == "aws"
    assert cfg.fetch.deadline_s == 30.0  # 20-b.toml sorts after 10-a.toml
    assert cfg.fetch.connect_timeout_s == 0.5
    assert cfg.aws.imds_url == "http://127.0.0.1:1"
    assert cfg.azure.imds_url == "http://169.254.169.254"  # untouched sections keep defaults


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[fetch]\ndeadline = 3\n", "unknown key"),
        ("[nosuch]\nx = 1\n", "unknown key"),
        ('provider = "vsphere"\n', "unknown provider"),
        ('[fetch]\ndeadline_s = "3"\n', "wrong type"),
        ("[network]\nwait = 1\n", "wrong type"),
        ("[files]\nallowed_paths = [1]\n", "list of strings"),
        ("fetch = 3\n", "must be a table"),
        ("[fetch\n", "not TOML"),
        # tomllib's int() refuses more than 4300 digits with a plain ValueError, and a deep
        # inline table ends in RecursionError: both are the file's fault (78), never exit 70.
        ("[fetch]\nretries = " + "9" * 5000 + "\n", "not TOML"),
        ("x = " + "{a = " * 2000 + "1" + "}" * 2000 + "\n", "not TOML"),
    ],
)
def test_bad_config_is_an_error(tmp_path: Path, text: str, fragment: str) -> None:
    f = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError, match=fragment):
        config.load(str(tmp_path), str(f))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[netns]\nname = "a/b"\n', "netns.name"),
        ('[netns]\nname = ".."\n', "netns.name"),
        ("[fetch]\ndeadline_s = -5\n", "fetch.deadline_s"),
        ("[fetch]\ndeadline_s = 0\n", "fetch.deadline_s"),
        ("[tpm]\npcr = 99\n", "tpm.pcr"),
        ("[tpm]\npcr = -1\n", "tpm.pcr"),
        ('[tpm]\ndevice = "dev/tpmrm0"\n', "tpm.device"),
        ('[files]\nallowed_paths = ["/run/peerpod/../etc/x"]\n', "files.allowed_paths"),
        ('[files]\npeerpod_dir = "/run/peerpod/"\n', "files.peerpod_dir"),
        ("[files]\ndefault_mode = 0o17777\n", "files.default_mode"),
        ('[azure]\nimds_url = "https://169.254.169.254"\n', "azure.imds_url"),
        ('[azure]\nwireserver_url = "http://"\n', "azure.wireserver_url"),
        ('[aws]\nimds_url = "169.254.169.254"\n', "aws.imds_url"),
        ('[gcp]\nmetadata_url = "http://a:99999"\n', "gcp.metadata_url"),
        ('[gcp]\nmetadata_url = "http://a:\u00b2"\n', "gcp.metadata_url"),  # isdigit(), but int() refuses it
        ('[gcp]\nmetadata_url = "http://a:\u0663"\n', "gcp.metadata_url"),  # an Arabic-Indic 3
        ('[gcp]\nmetadata_url = "http://a:0"\n', "gcp.metadata_url"),
        ('[aws]\nimds_url = "http://[fd00:ec2::254"\n', "aws.imds_url"),
        ('[aws]\nimds_url = "http://[fd00:ec2::254]x"\n', "aws.imds_url"),
        ('[aws]\nimds_url = "http://[not-an-address]"\n', "aws.imds_url"),
        ('[aws]\nimds_url = "http://169.254.169.254/?"\n', "aws.imds_url"),
        ('[aws]\nimds_url = "http://u@169.254.169.254"\n', "aws.imds_url"),
        ('[aws]\nimds_url = "http://169.254.169.254\t"\n', "aws.imds_url"),
        ('[aws]\nimds_url = "http://m\u00e9tadata"\n', "aws.imds_url"),  # httpio needs an ASCII host
        ('[aws]\nimds_url = "HTTP://169.254.169.254"\n', "aws.imds_url"),  # httpio's spelling only
        ("[aws]\ntoken_ttl_s = 0\n", "aws.token_ttl_s"),
        ('[netns]\nimds_addr = "300.1.1.1"\n', "netns.imds_addr"),
        ('[netns]\nimds_addr = "1.2.3.\u00b2"\n', "netns.imds_addr"),
        ('[netns]\nimds_addr = "169.254.169.0254"\n', "netns.imds_addr"),
        ('[netns]\nimds_addr = "010.1.1.1"\n', "netns.imds_addr"),  # octal to some tools: refused
        ('[netns]\nname = ""\n', "netns.name"),
        ('[netns]\nname = "n\u00e4me"\n', "netns.name"),
        ('[netns]\nname = "' + "n" * 65 + '"\n', "netns.name"),
        ('[netns]\nnft_table = "1table"\n', "netns.nft_table"),
        ('[netns]\nnft_table = "t\u0131"\n', "netns.nft_table"),
        ('[ibmcloud]\napi_version = "2022-03-0\u0663"\n', "ibmcloud.api_version"),
        ('[ibmcloud]\napi_version = "2022-03-01\\n"\n', "ibmcloud.api_version"),
        ('[netns]\nnft_table = "a b"\n', "netns.nft_table"),
        ("[cidata]\nlabels = []\n", "cidata.labels"),
        ('[openstack]\nconfig_drive_labels = ["' + "c" * 33 + '"]\n', "openstack.config_drive_labels"),
        ('[openstack]\nmetadata_url = "http://169.254.169.254/?x=1"\n', "openstack.metadata_url"),
        ('[ibmcloud]\napi_version = "latest"\n', "ibmcloud.api_version"),
        ("[fetch]\nbackoff_initial_s = 5\nbackoff_max_s = 1\n", "fetch.backoff_max_s"),
        ('[tpm]\nabsent = "fatal"\n', "tpm.absent"),
        ('[tpm]\nabsent = "Error"\n', "tpm.absent"),
        ('[tpm]\nenabled = false\nabsent = "error"\n', "tpm.absent"),  # requires what it switched off
    ],
)
def test_bad_values_are_refused_at_load(tmp_path: Path, text: str, key: str) -> None:
    f = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError, match="invalid value") as info:
        config.load(str(tmp_path), str(f))
    assert info.value.supporting_data["key"] == key
    assert info.value.exit_code == 78


def test_good_values_load(tmp_path: Path) -> None:
    f = write(
        tmp_path / "c.toml",
        '[aws]\nimds_url = "http://[fd00:ec2::254]:80"\n[azure]\nwireserver_url = "http://127.0.0.1:8080/x"\n'
        '[netns]\nname = "pod-ns_1.a"\nimds_addr = "169.254.169.254"\nnft_table = "_t1"\n[tpm]\npcr = 23\n'
        'absent = "warning"\n'
        '[gcp]\nmetadata_url = "http://metadata:65535/"\n[alibaba]\nmetadata_url = "http://[fd00::1]"\n'
        '[ibmcloud]\nmetadata_url = "http://h:"\napi_version = "2024-11-12"\n',
    )
    cfg = config.load(str(tmp_path), str(f))
    assert (cfg.tpm.pcr, cfg.tpm.absent) == (23, "warning")
    assert cfg.alibaba.metadata_url == "http://[fd00::1]"


def test_every_value_but_booleans_has_a_check() -> None:
    keys = {k for k, v in config.items(config.Config()) if not isinstance(v, bool) and k != "provider"}
    assert keys == set(config.CHECKS)


def test_defaults_pass_their_checks() -> None:
    config.validate(config.Config())


def test_origins_name_the_file_that_set_each_value(tmp_path: Path) -> None:
    main = write(tmp_path / "etc/guest-agent/config.toml", "[fetch]\ndeadline_s = 10\nread_timeout_s = 2\n")
    drop = write(tmp_path / "etc/guest-agent/config.d/10-a.toml", "[fetch]\ndeadline_s = 20\n")
    cfg, origins = config.load_with_origins(str(tmp_path))
    assert cfg.fetch.deadline_s == 20.0
    assert origins == {"fetch.deadline_s": str(drop), "fetch.read_timeout_s": str(main)}


def test_every_value_has_a_type_the_loader_knows() -> None:
    """config.merge checks a value against VALUE_TYPES[annotation]: every leaf field's annotation
    must be there (a new one would fail every load that sets the key)."""
    work: list[object] = [config.Config()]
    while work:
        obj = work.pop()
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                work.append(value)
            else:
                assert f.type in config.VALUE_TYPES, f.name
                assert isinstance(value, config.VALUE_TYPES[f.type]), f.name


def test_the_configuration_and_the_boot_paths_records_are_frozen() -> None:
    """Every section, and the records the boot path hands between stages, are frozen dataclasses:
    a stage cannot change what an earlier one decided."""
    from guest_agent import clouds, files, initdata, network, providers, safeyaml, transport, userdata
    from guest_agent.azure import health, wire
    from guest_agent.clouds import tokenflow

    sections = [type(getattr(config.Config(), f.name)) for f in dataclasses.fields(config.Config)]
    classes = (
        config.Config, *(c for c in sections if dataclasses.is_dataclass(c)),
        health.ReportResult, wire.GoalState, clouds.Facts, files.FileSpec, initdata.Initdata, network.RouteInfo,
        providers.Provider, safeyaml.Scalar, transport.Backoff, userdata.Plan, userdata.Parsed, tokenflow.Flavour,
    )  # fmt: skip
    assert [c.__name__ for c in classes if not (dataclasses.is_dataclass(c) and c.__dataclass_params__.frozen)] == []  # type: ignore[attr-defined]
    route = network.RouteInfo("169.254.169.254", 2, None, "10.0.0.5", 254, waited=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.ifindex = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.Config().fetch.deadline_s = 1.0  # type: ignore[misc]


def test_a_file_spec_never_shows_its_content() -> None:
    spec = files.FileSpec("/run/peerpod/auth.json", b"registry-password")
    assert "registry-password" not in repr(spec) and "/run/peerpod/auth.json" in repr(spec)

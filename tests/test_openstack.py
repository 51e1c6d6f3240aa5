"""OpenStack: the config drive (ISO9660 `config-2`, built as Nova builds it) and Nova's metadata service.

Config drives are real images from genisoimage and xorriso, attached to a scratch root the way
`cidata.find_volume` reads it (ROOT/sys/class/block/<name>, ROOT/dev/<name> is the image).  The
metadata service is the fake Nova of tests/fakecloud/imds.py on 127.0.0.1, and the hostile one is
tests/fakecloud/faults.py.  tests/test_clouds.py runs the shared metadata cases (retries, refusals,
no proxy, oversized answers, `guest-agent run` detected from DMI) for openstack too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from guest_agent import boot, iso9660
from guest_agent.config import Config
from guest_agent.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, MetadataUnavailable, UserDataInvalid
from tests import caa
from tests.fakecloud import configdrive, imds
from tests.fakecloud.faults import FAULTS, TOO_LARGE, FaultServer
from tests.fakecloud.server import FakeServer, Reply, Script
from tests.test_cidata import attach, build_iso, plain_iso
from tests.test_clouds import FakeTime, closed_port_url, make_cfg, peerpod_files, run_agent

USER_DATA = caa.cloud_config()
USER_DATA_PATH = "openstack/latest/user_data"

# Nova's own command line, by both tools; the others are what hand-made drives and other builders write.
FLAVOURS: dict[str, tuple[str, list[str]]] = {
    "genisoimage-nova": ("genisoimage", configdrive.GENISOIMAGE_ARGS),
    "xorriso-mkisofs-nova": ("xorriso", ["-as", "mkisofs", *configdrive.GENISOIMAGE_ARGS]),
    "genisoimage-rockridge": ("genisoimage", ["-r", "-V", "config-2"]),
    "genisoimage-joliet": ("genisoimage", ["-J", "-V", "config-2"]),
    # no extension: level-1 names (OPENSTAC/LATEST/USER_DAT.;1)
    "genisoimage-plain": ("genisoimage", ["-V", "config-2"]),
    "genisoimage-plain-long": ("genisoimage", ["-l", "-V", "CONFIG-2"]),
    "xorriso-native": ("xorriso-native", ["-volid", "config-2"]),
    "xorriso-native-no-rockridge": ("xorriso-native", ["-volid", "CONFIG-2", "-rockridge", "off"]),
}


def nova_drive(tmp_path: Path, user_data: bytes | None = USER_DATA, *, flavour: str = "genisoimage-nova") -> Path:
    """A config drive with Nova's files, built as FLAVOURS[flavour] builds it."""
    tool, args = FLAVOURS[flavour]
    return build_iso(tmp_path / "config-2.iso", configdrive.tree(tmp_path / "config-2", user_data), tool, args)


def os_cfg(url: str, *, deadline_s: float = 3.0, timeout_s: float = 0.3, limit: int | None = None) -> Config:
    c = make_cfg("openstack", url, deadline_s=deadline_s, timeout_s=timeout_s)
    return dataclasses.replace(c, limits=dataclasses.replace(c.limits, max_user_data_bytes=limit)) if limit else c


def fetch(root: Path, cfg: Config, ft: FakeTime | None = None) -> bytes:
    ft = ft or FakeTime()
    return boot.fetch_user_data("openstack", cfg, str(root), ft.deps())


@pytest.fixture
def nova() -> Iterator[Callable[..., FakeServer]]:
    started: list[FakeServer] = []

    def start(user_data: bytes | None = USER_DATA, script: Script | None = None) -> FakeServer:
        server = FakeServer("nova", imds.openstack(user_data, script or Script())).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


# -- the ISO9660 reader on config drives


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_reader_on_config_drives(flavour: str, tmp_path: Path) -> None:
    iso = nova_drive(tmp_path, flavour=flavour)
    with open(iso, "rb") as f:
        assert iso9660.volume_label(f).lower() == "config-2"
        assert iso9660.read_file(f, USER_DATA_PATH, limit=1 << 20) == USER_DATA
        assert iso9660.read_file(f, "openstack/2012-08-10/user_data", limit=1 << 20) == b"#cloud-config\n# 2012-08-10"
        meta = iso9660.read_file(f, "openstack/latest/meta_data.json", limit=1 << 20)
        assert json.loads(meta or b"") == imds.NOVA_META_DATA
        for absent in ("openstack/latest/missing", "openstack/nope/user_data", "nope/latest/user_data", "user_data"):
            assert iso9660.read_file(f, absent, limit=1 << 20) is None, absent
        # a directory is not a file, and a file is not a directory
        assert iso9660.read_file(f, "openstack/latest", limit=1 << 20) is None
        assert iso9660.read_file(f, "openstack/latest/user_data/x", limit=1 << 20) is None
        with pytest.raises(iso9660.TooLarge):
            iso9660.read_file(f, USER_DATA_PATH, limit=len(USER_DATA) - 1)


@pytest.mark.parametrize("path", ["", "/openstack/latest/user_data", "openstack//user_data", "a/" * 8 + "b"])
def test_reader_refuses_paths_it_was_not_written_for(path: str, tmp_path: Path) -> None:
    with open(nova_drive(tmp_path), "rb") as f, pytest.raises(ValueError):
        iso9660.read_file(f, path, limit=1 << 20)


def _patch_records(image: bytearray, edit: Callable[[bytearray, int], None]) -> None:
    """Apply `edit(image, record_offset)` to every directory record of the primary tree below the
    root (the image's own layout, so the hostile values sit where a reader looks)."""
    pvd = 16 * iso9660.SECTOR
    root_extent = int.from_bytes(image[pvd + 156 + 2 : pvd + 156 + 6], "little")
    todo, seen = [root_extent], set()
    while todo:
        extent = todo.pop()
        if extent in seen:
            continue
        seen.add(extent)
        pos = extent * iso9660.SECTOR
        end = pos + iso9660.SECTOR
        while pos < end and image[pos]:
            rlen, flags, name = image[pos], image[pos + 25], image[pos + 33 : pos + 33 + image[pos + 32]]
            if flags & 0x02 and name not in (b"\x00", b"\x01"):
                todo.append(int.from_bytes(image[pos + 2 : pos + 6], "little"))
            edit(image, pos)
            pos += rlen


@pytest.mark.parametrize(
    "hostile", ["loop-to-root", "extent-past-the-end", "file-past-the-end", "huge-sizes", "zero-lengths"]
)
def test_reader_on_hostile_directory_records(hostile: str, tmp_path: Path) -> None:
    """Every directory record of a plain (level-1, primary-only) drive rewritten: the walk ends,
    bounded, with no file, TooLarge or NotIso, never another exception."""
    image = bytearray(nova_drive(tmp_path, flavour="genisoimage-plain").read_bytes())
    pvd = 16 * iso9660.SECTOR
    root_extent = image[pvd + 156 + 2 : pvd + 156 + 6]

    def edit(img: bytearray, pos: int) -> None:
        if img[pos + 33 : pos + 34] in (b"\x00", b"\x01"):
            return
        if hostile == "loop-to-root":  # every subdirectory is the root again
            if img[pos + 25] & 0x02:
                img[pos + 2 : pos + 6] = root_extent
        elif hostile == "extent-past-the-end":
            img[pos + 2 : pos + 6] = (0xFFFFFFF0).to_bytes(4, "little")
        elif hostile == "file-past-the-end":  # directories intact, files' data beyond the image
            if not img[pos + 25] & 0x02:
                img[pos + 2 : pos + 6] = (len(img) // iso9660.SECTOR + 1).to_bytes(4, "little")
        elif hostile == "huge-sizes":
            img[pos + 10 : pos + 14] = (0xFFFFFFFF).to_bytes(4, "little")
        else:
            img[pos + 10 : pos + 14] = bytes(4)

    _patch_records(image, edit)
    p = tmp_path / "hostile.iso"
    p.write_bytes(bytes(image))
    with open(p, "rb") as f:
        if hostile == "huge-sizes":  # refused as too large, before anything is read
            with pytest.raises(iso9660.TooLarge):
                iso9660.read_file(f, USER_DATA_PATH, limit=1 << 20)
        elif hostile == "file-past-the-end":  # the volume is refused, not read as empty user-data
            with pytest.raises(iso9660.NotIso, match="past the end"):
                iso9660.read_file(f, USER_DATA_PATH, limit=1 << 20)
        else:  # the walk finds no user_data: no bytes from outside the file are taken for it
            assert iso9660.read_file(f, USER_DATA_PATH, limit=1 << 20) is None


# -- the provider: the config drive first


def test_config_drive_wins_over_the_metadata_service(nova: Callable[..., FakeServer], tmp_path: Path) -> None:
    server = nova(b"#cloud-config\n# from the metadata service\n")
    root = tmp_path / "root"
    attach(root, "vda", b"\0" * 64 * 1024)  # the OS disk: not ISO9660
    attach(root, "sr0", nova_drive(tmp_path))
    assert fetch(root, os_cfg(server.url)) == USER_DATA
    assert server.requests == []


@pytest.mark.parametrize("flavour", ["genisoimage-plain-long", "xorriso-native-no-rockridge"])
def test_config_drive_labelled_upper_case(flavour: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "vdb", nova_drive(tmp_path, flavour=flavour))
    assert fetch(root, os_cfg(closed_port_url())) == USER_DATA


def test_config_drive_without_user_data_is_no_user_data(nova: Callable[..., FakeServer], tmp_path: Path) -> None:
    """Nova writes no user_data file for an instance booted without one: default initdata only."""
    server = nova()
    root = tmp_path / "root"
    attach(root, "sr0", nova_drive(tmp_path, user_data=None))
    assert fetch(root, os_cfg(server.url)) == b""
    assert server.requests == []


def test_a_cidata_disk_is_not_a_config_drive(nova: Callable[..., FakeServer], tmp_path: Path) -> None:
    server = nova()
    root = tmp_path / "root"
    attach(root, "sr0", plain_iso(tmp_path, {"user-data": b"#cloud-config\n# cidata\n"}))
    assert fetch(root, os_cfg(server.url)) == USER_DATA
    assert [r.path for r in server.requests] == ["/openstack/latest/user_data"]


def test_oversized_user_data_on_the_drive_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "sr0", nova_drive(tmp_path, user_data=b"#" * 5000))
    with pytest.raises(UserDataInvalid) as ei:
        fetch(root, os_cfg(closed_port_url(), limit=4096))
    assert ei.value.exit_code == EXIT_CONFIG
    assert (ei.value.supporting_data["device"], ei.value.supporting_data["limit_bytes"]) == ("sr0", 4096)


def test_a_malformed_config_drive_falls_back_to_the_metadata_service(
    nova: Callable[..., FakeServer], tmp_path: Path
) -> None:
    """A volume descriptor saying CD001 and config-2 over garbage: the drive yields nothing, the
    metadata service is asked, nothing escapes."""
    vd = bytearray(iso9660.SECTOR)
    vd[0:6] = b"\x01CD001"
    vd[40:48] = b"config-2"
    vd[156 : 156 + 34] = bytes([34]) + bytes(1) + (0xFFFFFF00).to_bytes(4, "little") * 2 + bytes(26)
    root = tmp_path / "root"
    attach(root, "sr0", bytes(16 * iso9660.SECTOR) + bytes(vd) + b"\xff" * iso9660.SECTOR)
    server = nova()
    assert fetch(root, os_cfg(server.url)) == USER_DATA


# -- the provider: Nova's metadata service


def test_metadata_request_shape(nova: Callable[..., FakeServer], tmp_path: Path) -> None:
    server = nova()
    assert fetch(tmp_path, os_cfg(server.url)) == USER_DATA
    [req] = server.requests
    assert (req.method, req.path, req.query) == ("GET", "/openstack/latest/user_data", {})
    assert req.header("X-Forwarded-For") is None


def test_404_with_meta_data_is_no_user_data(nova: Callable[..., FakeServer], tmp_path: Path) -> None:
    server = nova(user_data=None)
    ft = FakeTime()
    assert fetch(tmp_path, os_cfg(server.url), ft) == b""
    assert [r.path for r in server.requests] == ["/openstack/latest/user_data", "/openstack/latest/meta_data.json"]
    assert server.requests[1].header("Accept") == "application/json"
    assert ft.sleeps == []


@pytest.mark.parametrize(
    "meta",
    [Reply(404, "Not Found"), Reply(500, "oops"), Reply(200, "<html>"), Reply(200, "[]"), Reply(200, "[" * 100)],
    ids=["404", "500", "not-json", "not-an-object", "deep"],
)
def test_404_is_retried_until_meta_data_says_the_instance_is_known(
    meta: Reply, nova: Callable[..., FakeServer], tmp_path: Path
) -> None:
    """A proxy in front of Nova that cannot yet tell the instance may answer 404 too."""
    server = nova(user_data=None, script=Script({"meta-data": [meta]}))
    ft = FakeTime()
    assert fetch(tmp_path, os_cfg(server.url), ft) == b""
    assert len(server.requests) == 4
    assert ft.sleeps == [Config().fetch.backoff_initial_s]


def test_404_then_user_data(nova: Callable[..., FakeServer], tmp_path: Path) -> None:
    script = Script({"user-data": [Reply(404, "Not Found")], "meta-data": [Reply(404, "Not Found")]})
    server = nova(script=script)
    assert fetch(tmp_path, os_cfg(server.url)) == USER_DATA
    assert [r.path for r in server.requests][-1] == "/openstack/latest/user_data"


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def test_a_misbehaving_metadata_service_ends_by_the_deadline(faults: FaultServer, tmp_path: Path) -> None:
    """Every transport fault as Nova's metadata service (all at once, real time): exit 69 at the
    deadline; an answer past the size limit: 78 at once."""
    cases = {**dict.fromkeys(FAULTS, EXIT_UNAVAILABLE), **dict.fromkeys(TOO_LARGE, EXIT_CONFIG)}

    def one(name: str) -> int:
        cfg = os_cfg(f"{faults.url}/fault/{name}", deadline_s=1.0, timeout_s=0.3)
        try:
            boot.fetch_user_data("openstack", cfg, str(tmp_path), boot.Deps())
        except (MetadataUnavailable, UserDataInvalid) as exc:
            return exc.exit_code
        return 0

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        got = dict(zip(cases, pool.map(one, cases), strict=True))
    assert got == cases


# -- the whole agent: detected from DMI, provisioned from the drive or the metadata service


def test_cli_run_from_the_config_drive_detected_from_dmi(tmp_path: Path) -> None:
    initdata = caa.initdata_toml()
    root = tmp_path / "root"
    attach(root, "sr0", nova_drive(tmp_path, caa.cloud_config(initdata=initdata)))
    proc = run_agent("openstack", root, closed_port_url())  # no metadata service: the drive alone provisions
    assert proc.returncode == 0
    assert "provider openstack (detected from DMI)" in proc.stderr
    assert "route to" not in proc.stderr  # read before the network wait, which it spares
    files = peerpod_files(root)
    assert files["/run/peerpod/apf.json"] == caa.expected_files()["/run/peerpod/apf.json"]
    assert files["/run/peerpod/initdata.digest"] == caa.digest(initdata).encode()
    assert files["/run/peerpod/aa.toml"] == caa.AA_TOML.encode()


@pytest.mark.parametrize("source", ["config-drive", "metadata-service"])
def test_cli_run_without_user_data_writes_the_default_initdata(
    source: str, nova: Callable[..., FakeServer], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    server = nova(user_data=None)
    if source == "config-drive":
        attach(root, "sr0", nova_drive(tmp_path, user_data=None))
    proc = run_agent("openstack", root, server.url, provider="openstack")
    assert proc.returncode == 0
    assert "default initdata only" in proc.stderr
    assert "user-data applied; READY=1 sent" in proc.stderr
    files = peerpod_files(root)
    assert set(files) == {"/run/peerpod/initdata", "/run/peerpod/aa.toml", "/run/peerpod/initdata.digest"}
    assert len(server.requests) == (0 if source == "config-drive" else 2)
    assert ("route to" in proc.stderr) == (source == "metadata-service")  # the drive needs no network


def test_cli_run_refused_by_the_metadata_service_exits_69(nova: Callable[..., FakeServer], tmp_path: Path) -> None:
    server = nova(script=Script({"user-data": [Reply(403, "Forbidden")]}))
    proc = run_agent("openstack", tmp_path / "root", server.url)
    assert proc.returncode == 69
    assert "OpenStack metadata user_data was refused by the metadata service" in proc.stderr
    assert peerpod_files(tmp_path / "root") == {}

"""The cidata source: ISO9660 parsing of real images (genisoimage, xorriso) and the provider.

The provider is driven through `boot.fetch_user_data` with a scratch root laid out the way
`scan_devices` reads it: `ROOT/sys/class/block/<name>` lists the devices and
`ROOT/dev/<name>` is the device itself (here: the ISO image file).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_agent import boot, iso9660
from guest_agent.clouds import cidata
from guest_agent.config import Config
from guest_agent.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, MetadataUnavailable, UserDataInvalid
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script

USER_DATA = caa.cloud_config()
META_DATA = b"instance-id: podvm-nginx-6b8f9\nlocal-hostname: podvm-nginx-6b8f9\n"
SEED = {"user-data": USER_DATA, "meta-data": META_DATA, "vendor-data": b"", "network-config": b"version: 2\n"}

GENISOIMAGE = shutil.which("genisoimage")
XORRISO = shutil.which("xorriso")
needs_genisoimage = pytest.mark.skipif(GENISOIMAGE is None, reason="genisoimage is not installed")

# (tool, arguments, label): each writes the directory tree given after the arguments.
FLAVOURS: dict[str, tuple[str, list[str], str]] = {
    # Joliet + Rock Ridge: what cloud-localds and most cidata recipes use
    "genisoimage-joliet-rockridge": ("genisoimage", ["-V", "cidata", "-J", "-r"], "cidata"),
    "genisoimage-rockridge": ("genisoimage", ["-V", "CIDATA", "-r"], "CIDATA"),
    "genisoimage-joliet": ("genisoimage", ["-V", "cidata", "-J"], "cidata"),
    # No extension at all: level-1 names, "user-data" is stored as USER_DAT.;1
    "genisoimage-plain": ("genisoimage", ["-V", "cidata"], "cidata"),
    # No extension, long names: USER_DATA.;1
    "genisoimage-plain-long": ("genisoimage", ["-V", "cidata", "-l"], "cidata"),
    # No extension, names kept verbatim (user-data.;1), like in-memory Go writers produce
    "genisoimage-plain-verbatim": (
        "genisoimage",
        ["-V", "cidata", "-l", "-allow-lowercase", "-relaxed-filenames"],
        "cidata",
    ),
    "xorriso-mkisofs-joliet-rockridge": ("xorriso", ["-as", "mkisofs", "-V", "cidata", "-J", "-r"], "cidata"),
    # native xorriso always writes Rock Ridge unless told not to
    "xorriso-native": ("xorriso-native", ["-volid", "CIDATA"], "CIDATA"),
    "xorriso-native-no-rockridge": ("xorriso-native", ["-volid", "cidata", "-rockridge", "off"], "cidata"),
}


def make_iso(out: Path, files: dict[str, bytes], tool: str, args: list[str]) -> Path:
    src = out.with_suffix(".src")
    src.mkdir(parents=True)
    for name, content in files.items():
        (src / name).write_bytes(content)
    return build_iso(out, src, tool, args)


def build_iso(out: Path, src: Path, tool: str, args: list[str]) -> Path:
    """The image of directory tree `src` by `tool` (a FLAVOURS entry's tool and arguments)."""
    if tool == "genisoimage":
        if GENISOIMAGE is None:
            pytest.skip("genisoimage is not installed")
        cmd = [GENISOIMAGE, "-quiet", "-o", str(out), *args, str(src)]
    else:
        if XORRISO is None:
            pytest.skip("xorriso is not installed")
        if tool == "xorriso-native":
            cmd = [XORRISO, "-outdev", str(out), *args, "-map", str(src), "/"]
        else:
            cmd = [XORRISO, *args, "-quiet", "-o", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def plain_iso(tmp_path: Path, files: dict[str, bytes], label: str = "cidata", name: str = "seed.iso") -> Path:
    return make_iso(tmp_path / name, files, "genisoimage", ["-V", label, "-J", "-r"])


def attach(root: Path, name: str, image: Path | bytes | None) -> None:
    """A block device `name` in ROOT/sys/class/block, backed by ROOT/dev/name (absent if None)."""
    (root / "sys/class/block" / name).mkdir(parents=True, exist_ok=True)
    (root / "dev").mkdir(exist_ok=True)
    if isinstance(image, Path):
        shutil.copyfile(image, root / "dev" / name)
    elif image is not None:
        (root / "dev" / name).write_bytes(image)


def cidata_cfg(*, wait_s: float = 0.0, limit: int | None = None, deadline_s: float = 3.0) -> Config:
    c = Config()
    return dataclasses.replace(
        c,
        provider="cidata",
        fetch=dataclasses.replace(c.fetch, deadline_s=deadline_s),
        cidata=dataclasses.replace(c.cidata, wait_s=wait_s),
        limits=dataclasses.replace(c.limits, max_user_data_bytes=limit or c.limits.max_user_data_bytes),
    )


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fetch(root: Path, cfg: Config, provider: str = "cidata") -> tuple[bytes, Sleeps]:
    sleeps = Sleeps()
    data = boot.fetch_user_data(provider, cfg, str(root), boot.Deps(sleep=sleeps))
    return data, sleeps


# -- the ISO9660 reader on real images


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_reader_on_real_images(flavour: str, tmp_path: Path) -> None:
    tool, args, label = FLAVOURS[flavour]
    iso = make_iso(tmp_path / "seed.iso", SEED, tool, args)
    with open(iso, "rb") as f:
        assert iso9660.volume_label(f) == label
        for name, content in SEED.items():
            assert iso9660.read_file(f, name, limit=1 << 20) == content, name
        if flavour not in ("genisoimage-plain", "genisoimage-joliet"):
            # Level-1 names are 8.3: "user-dat" and "user-data" are both USER_DAT. in the primary
            # directory, which is all a plain image has, and the fallback after a Joliet miss.
            assert iso9660.read_file(f, "user-dat", limit=1 << 20) is None
        assert iso9660.read_file(f, "missing", limit=1 << 20) is None


@pytest.mark.parametrize("flavour", ["genisoimage-joliet-rockridge", "genisoimage-plain"])
def test_reader_multi_sector_file_among_many(flavour: str, tmp_path: Path) -> None:
    # 40 KiB of user-data spans 20 sectors; 150 files make the root directory span several sectors.
    big = b"".join(b"#%05d the quick brown fox jumps over the lazy dog\n" % i for i in range(800))
    files = {f"file{i:03d}": b"x" for i in range(150)} | {"user-data": big}
    tool, args, _ = FLAVOURS[flavour]
    iso = make_iso(tmp_path / "big.iso", files, tool, args)
    with open(iso, "rb") as f:
        assert iso9660.read_file(f, "user-data", limit=1 << 20) == big
        with pytest.raises(iso9660.TooLarge):
            iso9660.read_file(f, "user-data", limit=len(big) - 1)


def test_reader_ignores_directories_and_nested_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "user-data").mkdir(parents=True)  # a directory with the name is not the file
    (src / "user-data" / "user-data").write_bytes(b"nested")
    iso = tmp_path / "dir.iso"
    if GENISOIMAGE is None:
        pytest.skip("genisoimage is not installed")
    subprocess.run([GENISOIMAGE, "-quiet", "-o", str(iso), "-V", "cidata", "-J", "-r", str(src)], check=True)
    with open(iso, "rb") as f:
        assert iso9660.read_file(f, "user-data", limit=1 << 20) is None


@pytest.mark.parametrize("data", [b"", b"\0" * 4096, b"\0" * (17 * 2048), b"not an iso" * 10000])
def test_reader_not_iso(data: bytes, tmp_path: Path) -> None:
    p = tmp_path / "disk"
    p.write_bytes(data)
    with open(p, "rb") as f:
        with pytest.raises(iso9660.NotIso):
            iso9660.volume_label(f)
        with pytest.raises(iso9660.NotIso):
            iso9660.read_file(f, "user-data", limit=1 << 20)


# -- the provider


@needs_genisoimage
def test_provider_reads_the_disk(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "sda", b"\0" * 64 * 1024)  # the OS disk: not ISO9660
    attach(root, "sda1", None)  # listed, but no device node: skipped
    attach(root, "sr0", plain_iso(tmp_path, SEED))
    data, sleeps = fetch(root, cidata_cfg())
    assert data == USER_DATA
    assert sleeps == []


@needs_genisoimage
@pytest.mark.parametrize("label", ["cidata", "CIDATA"])
def test_provider_accepts_both_labels(label: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "vdb", plain_iso(tmp_path, SEED, label=label))
    assert fetch(root, cidata_cfg())[0] == USER_DATA


@needs_genisoimage
def test_seed_file_wins_over_the_disk(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "sr0", plain_iso(tmp_path, SEED))
    seed = root / "media/cidata"
    seed.mkdir(parents=True)
    (seed / "user-data").write_bytes(b"#cloud-config\n# from the seed file\n")
    assert fetch(root, cidata_cfg())[0] == b"#cloud-config\n# from the seed file\n"


def test_seed_file_without_any_disk(tmp_path: Path) -> None:
    seed = tmp_path / "media/cidata"
    seed.mkdir(parents=True)
    (seed / "user-data").write_bytes(USER_DATA)
    assert fetch(tmp_path, cidata_cfg())[0] == USER_DATA


@needs_genisoimage
def test_other_labels_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "sr0", plain_iso(tmp_path, SEED, label="config-2"))
    with pytest.raises(MetadataUnavailable) as ei:
        fetch(root, cidata_cfg())
    assert ei.value.exit_code == EXIT_UNAVAILABLE
    assert "no ISO9660 disk labelled cidata" in ei.value.reason


@needs_genisoimage
def test_the_labelled_disk_is_found_among_others(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "sr0", plain_iso(tmp_path, {"user-data": b"#cloud-config\n# wrong disk\n"}, label="config-2"))
    attach(root, "sr1", plain_iso(tmp_path, SEED, name="right.iso"))
    assert fetch(root, cidata_cfg())[0] == USER_DATA


@needs_genisoimage
def test_cidata_disk_without_user_data(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "sr0", plain_iso(tmp_path, {"meta-data": META_DATA}))
    with pytest.raises(MetadataUnavailable) as ei:
        fetch(root, cidata_cfg())
    assert ei.value.reason == "the cidata disk has no user-data file"
    assert ei.value.supporting_data["device"] == "sr0"


def test_no_disk_after_a_short_wait(tmp_path: Path) -> None:
    # wait_s > 0 subscribes to kernel uevents and waits for a block device to appear; none
    # does here (a real device hot-plug cannot be staged safely in a test), so after
    # wait_s the provider gives up.  Not retried: the disk either is there or is not.
    (tmp_path / "sys/class/block").mkdir(parents=True)
    with pytest.raises(MetadataUnavailable) as ei:
        fetch(tmp_path, cidata_cfg(wait_s=0.2))
    assert ei.value.supporting_data["seed"] == "/media/cidata/user-data"
    assert ei.value.supporting_data["waited_s"] == 0.2


def in_thread(fn: Callable[[], bytes]) -> BaseException | bytes:
    """Run fn with a hang guard: a regression that blocks must fail the test, not hang it."""
    result: list[BaseException | bytes] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the cidata provider blocked"
    return result[0]


def test_no_wait_when_wait_s_is_zero_or_the_deadline_is_spent(tmp_path: Path) -> None:
    # The uevent wait itself needs a real block device to appear (not possible safely here).
    # What can be shown: no socket wait happens when there is no time for one.  wait_s is
    # huge, but the fetch deadline is 0: if the provider waited for uevents the call would
    # block for an hour, so it runs in a thread with a hang guard.
    cfg = cidata_cfg(wait_s=3600.0, deadline_s=0.0)
    assert isinstance(in_thread(lambda: fetch(tmp_path, cfg)[0]), MetadataUnavailable)
    c = Config().cidata
    assert cidata.find_disk(str(tmp_path), c, 1024, wait_s=0) is None


@needs_genisoimage
def test_user_data_over_the_limit_on_the_disk(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "sr0", plain_iso(tmp_path, {"user-data": b"#" * 5000}))
    with pytest.raises(UserDataInvalid) as ei:
        fetch(root, cidata_cfg(limit=4096))
    assert ei.value.exit_code == EXIT_CONFIG
    assert ei.value.supporting_data["device"] == "sr0"
    assert ei.value.supporting_data["limit_bytes"] == 4096


def test_seed_file_over_the_limit(tmp_path: Path) -> None:
    seed = tmp_path / "media/cidata"
    seed.mkdir(parents=True)
    (seed / "user-data").write_bytes(b"#" * 4097)
    with pytest.raises(UserDataInvalid) as ei:
        fetch(tmp_path, cidata_cfg(limit=4096))
    assert ei.value.supporting_data["limit_bytes"] == 4096
    (seed / "user-data").write_bytes(b"#" * 4096)  # exactly the limit is fine
    assert fetch(tmp_path, cidata_cfg(limit=4096))[0] == b"#" * 4096


# -- IBM Cloud: the config disk first, the metadata service otherwise


@needs_genisoimage
def test_ibmcloud_prefers_the_cidata_disk(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "vdb", plain_iso(tmp_path, SEED))
    with FakeServer("imds", imds.ibmcloud(b"#cloud-config\n# from the metadata service\n", Script())) as server:
        c = Config()
        cfg = dataclasses.replace(c, ibmcloud=dataclasses.replace(c.ibmcloud, metadata_url=server.url))
        assert fetch(root, cfg, provider="ibmcloud")[0] == USER_DATA
        assert server.requests == []


@needs_genisoimage
def test_ibmcloud_without_a_cidata_disk_uses_the_metadata_service(tmp_path: Path) -> None:
    root = tmp_path / "root"
    attach(root, "vdb", plain_iso(tmp_path, SEED, label="config-2"))
    with FakeServer("imds", imds.ibmcloud(USER_DATA, Script())) as server:
        c = Config()
        cfg = dataclasses.replace(c, ibmcloud=dataclasses.replace(c.ibmcloud, metadata_url=server.url))
        assert fetch(root, cfg, provider="ibmcloud")[0] == USER_DATA
        assert [r.method for r in server.requests] == ["PUT", "GET"]


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_seed_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    seed = tmp_path / "media/cidata"
    seed.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_bytes(USER_DATA)
    if kind == "fifo":
        os.mkfifo(seed / "user-data")  # nobody ever writes: a blocking open() would never return
    elif kind == "symlink":
        (seed / "user-data").symlink_to(target)
    else:
        (seed / "user-data").mkdir()
    got = in_thread(lambda: fetch(tmp_path, cidata_cfg())[0])
    assert isinstance(got, UserDataInvalid), got
    assert got.reason == "the cidata seed is not a regular file"
    assert got.supporting_data["type"] == {"fifo": "p", "symlink": "l", "directory": "d"}[kind]


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("user-data", "USER_DAT."),
        ("meta-data", "META_DAT."),
        ("network-config", "NETWORK_."),
        ("a.b.tar", "A_B.TAR"),  # the last dot starts the extension
        ("x.json5", "X.JSO"),
        ("stra\u00dfe", "STRASSE."),  # upper() first: sharp s is SS
        ("\u00e9t\u00e9", "_T_."),
    ],
)
def test_level1_names(name: str, stored: str) -> None:
    """What a strict ISO9660 level-1 writer (genisoimage without -r/-J/-l) stores for a name."""
    assert iso9660._level1(name) == stored

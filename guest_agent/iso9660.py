"""Read one file from an ISO9660 image without mounting it (pure parsing over a file object).

Enough of ECMA-119 for a cloud-init `cidata` disk and an OpenStack config drive: the primary
volume descriptor's label, and a file found by its path (`user-data`,
`openstack/latest/user_data`), each component by its Joliet name (UCS-2), its Rock Ridge NM name,
or its plain ISO9660 name (upper case, `;1` version suffix on files).  Reading the block device
directly avoids waiting for udev's by-label link and a mount.

The image is the host's: every offset and length in it is hostile.  Reads are bounded (32
descriptors, one primary and one Joliet tree, one directory of at most 1 MiB per path component,
the file by `limit`), the record walk always advances, and the only exceptions are the agent's own
(`NotIso`, `TooLarge`) and `OSError` from the device itself.
"""

from __future__ import annotations

import re
import struct
from typing import BinaryIO

from guest_agent.errors import MetadataUnavailable, UserDataInvalid

SECTOR = 2048
MAX_DIRECTORY_BYTES = 1 << 20  # one directory's extent, read whole (a config drive's are one sector)
MAX_PATH_COMPONENTS = 8
_JOLIET_ESCAPES = (b"%/@", b"%/C", b"%/E")
_NOT_D_CHARACTER = re.compile("[^A-Z0-9_]")  # ECMA-119 §7.4.1


class NotIso(MetadataUnavailable):
    """Not an ISO9660 image (the caller moves on to the next device)."""


class TooLarge(UserDataInvalid):
    """The wanted file is larger than the caller's limit."""


def _descriptors(dev: BinaryIO) -> list[bytes]:
    out: list[bytes] = []
    for lba in range(16, 16 + 32):
        dev.seek(lba * SECTOR)
        vd = dev.read(SECTOR)
        if len(vd) < SECTOR or vd[1:6] != b"CD001":
            if not out:
                raise NotIso("no ISO9660 volume descriptor")
            break
        if vd[0] == 255:
            break
        out.append(vd)
    return out


def volume_label(dev: BinaryIO) -> str:
    for vd in _descriptors(dev):
        if vd[0] == 1:
            return vd[40:72].decode("ascii", "replace").strip()
    raise NotIso("no primary volume descriptor")


def _records(dev: BinaryIO, extent: int, length: int, limit: int) -> list[tuple[bytes, int, int, int, bytes]]:
    """(name, extent, size, flags, system_use) of each record in a directory extent."""
    dev.seek(extent * SECTOR)
    data = dev.read(min(length, limit))
    out, pos = [], 0
    while pos < len(data):
        rlen = data[pos]
        if rlen == 0:  # records never cross a sector boundary: skip the padding
            pos = (pos // SECTOR + 1) * SECTOR
            continue
        rec = data[pos : pos + rlen]
        if len(rec) < 34:
            break
        ext, size = struct.unpack_from("<I", rec, 2)[0], struct.unpack_from("<I", rec, 10)[0]
        nlen = rec[32]
        name = rec[33 : 33 + nlen]
        su_start = 33 + nlen + (1 - nlen % 2)  # a pad byte follows an even-length name
        out.append((name, ext, size, rec[25], rec[su_start:]))
        pos += rlen
    return out


def _rock_ridge_name(su: bytes) -> str | None:
    pos = 0
    while pos + 4 <= len(su):
        sig, ln = su[pos : pos + 2], su[pos + 2]
        if ln < 4:
            break
        if sig == b"NM" and ln > 5:
            return su[pos + 5 : pos + ln].decode("utf-8", "replace")
        pos += ln
    return None


def _plain(name: str) -> str:
    return name.split(";", 1)[0].rstrip(".").lower()


def _level1(name: str) -> str:
    """`name` as a strict ISO9660 level-1 writer stores it (ECMA-119 §7.5: d-characters, 8.3):
    `genisoimage` without -r/-J/-l turns "user-data" into `USER_DAT.;1` (version stripped here)."""
    base, _, ext = name.rpartition(".") if "." in name else (name, "", "")

    def d(s: str, n: int) -> str:
        return _NOT_D_CHARACTER.sub("_", s.upper())[:n]

    return f"{d(base, 8)}.{d(ext, 3)}"


def _find(
    dev: BinaryIO, joliet: bool, extent: int, length: int, wanted: str, *, directory: bool
) -> tuple[int, int] | None:
    """(extent, size) of the entry `wanted` in one directory, a directory or a file as asked."""
    wanted_level1 = _level1(wanted).rstrip(".")  # a directory has no "."
    for raw, ext, size, flags, su in _records(dev, extent, length, limit=MAX_DIRECTORY_BYTES):
        if bool(flags & 0x02) != directory or raw in (b"\x00", b"\x01"):
            continue  # the other kind, or "." and ".."
        level1 = False
        if joliet:
            name = raw.decode("utf-16-be", "replace").split(";", 1)[0]
        elif (rr := _rock_ridge_name(su)) is not None:
            name = rr
        else:
            text = raw.decode("ascii", "replace").split(";", 1)[0]
            name = _plain(text)
            level1 = text.rstrip(".") == wanted_level1
        if name == wanted or level1 or (not joliet and _plain(name).replace("_", "-") == wanted):
            return ext, size
    return None


def read_file(dev: BinaryIO, path: str, *, limit: int) -> bytes | None:
    """Content of the file at `path` ("user-data", "openstack/latest/user_data"), or None if absent.

    Each component is looked up in its parent directory alone, so the walk reads at most one
    directory per component of a path the caller wrote, whatever the image's tree holds."""
    parts = path.split("/")
    if not 0 < len(parts) <= MAX_PATH_COMPONENTS or "" in parts:
        raise ValueError(f"not a relative path of 1-{MAX_PATH_COMPONENTS} components: {path!r}")
    vds = _descriptors(dev)
    joliet = [vd for vd in vds if vd[0] == 2 and vd[88:91] in _JOLIET_ESCAPES]
    for vd in joliet[:1] + [vd for vd in vds if vd[0] == 1][:1]:  # the first of each: bounded work
        root = vd[156 : 156 + 34]
        extent, size = struct.unpack_from("<I", root, 2)[0], struct.unpack_from("<I", root, 10)[0]
        for i, part in enumerate(parts):
            hit = _find(dev, vd[0] == 2, extent, size, part, directory=i < len(parts) - 1)
            if hit is None:
                break
            extent, size = hit
        else:
            if size > limit:
                raise TooLarge(f"{path} on the ISO9660 image is larger than the size limit", limit_bytes=limit)
            dev.seek(extent * SECTOR)
            data = dev.read(size)
            if len(data) != size:  # a record pointing past the image: a damaged or forged volume
                raise NotIso(f"{path} extends past the end of the ISO9660 image")
            return data
    return None

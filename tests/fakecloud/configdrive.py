"""Nova's config drive: the files it holds and the genisoimage arguments Nova builds it with
(nova/virt/configdrive.py, _make_iso9660), for tests/test_openstack.py and the e2e `openstack` boot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fakecloud import imds

# Joliet + Rock Ridge, long lower-case names: what follows `genisoimage -o IMAGE` (or `xorriso -as mkisofs`).
NOVA_ARGS = ["-ldots", "-allow-lowercase", "-allow-multidot", "-l", "-publisher", "OpenStack Nova 29.0.1"]
GENISOIMAGE_ARGS = [*NOVA_ARGS, "-J", "-r", "-V", "config-2"]


def tree(src: Path, user_data: bytes | None) -> Path:
    """The files of a Nova config drive under `src`: every metadata version plus `latest`, and the
    EC2 tree.  Only `latest` holds `user_data`; the older versions hold a stand-in that must not be
    taken for it."""
    for version in imds.NOVA_VERSIONS:
        d = src / "openstack" / version
        d.mkdir(parents=True)
        (d / "meta_data.json").write_text(json.dumps(imds.NOVA_META_DATA))
        (d / "network_data.json").write_text('{"links": [], "networks": [], "services": []}')
        (d / "vendor_data.json").write_text("{}")
        if user_data is not None:
            (d / "user_data").write_bytes(user_data if version == "latest" else b"#cloud-config\n# " + version.encode())
    (src / "ec2/latest").mkdir(parents=True)
    (src / "ec2/latest/meta-data.json").write_text("{}")
    return src

"""User-data for the end-to-end boots (CAA-shaped, from tests/caa.py) and what the guest must hold.

CAA renders `#cloud-config` with a text template (docs/protocols.md §2): `write_files` entries
with `path` and a literal block `content: |`, so every file arrives with exactly one trailing
newline.  initdata is gzip+base64 TOML whose `[data]` holds aa.toml, cdh.toml and policy.rego;
the guest writes those files and `initdata.digest`, and extends PCR 8.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass

from tests import caa


@dataclass(frozen=True)
class Expected:
    """What the guest must end up with."""

    files: dict[str, bytes]  # name under /run/peerpod -> content
    initdata_digest: str  # hex
    pcr8: str  # hex, sha256 bank, after one extend from zero
    pod: str  # "namespace/name", as the stand-in APF announces it


def pcr_after_extend(digest_hex: str) -> str:
    """PCR = SHA256(zero32 || first 32 bytes of the digest) (CAA's extend of the first 64 hex chars)."""
    return hashlib.sha256(b"\0" * 32 + bytes.fromhex(digest_hex[:64])).hexdigest()


def valid(pod_name: str = "nginx-e2e-7d9f") -> tuple[bytes, Expected]:
    toml = caa.initdata_toml("sha256")
    apf = caa.apf_json(pod_name)
    raw = caa.cloud_config(apf=apf, initdata=toml, scratch=False)
    files = {path.rsplit("/", 1)[1]: content for path, content in caa.expected_files(apf=apf, initdata=toml).items()}
    files.pop("scratch-space.marker")
    files.update({k: v.encode() for k, v in tomllib.loads(toml.decode())["data"].items()})
    digest = hashlib.sha256(toml).hexdigest()
    files["initdata.digest"] = digest.encode()
    return raw, Expected(files, digest, pcr_after_extend(digest), f"default/{pod_name}")


def invalid() -> bytes:
    """A cloud-config with a key CAA's strict parser rejects (runcmd): the agent must refuse it."""
    return caa.cloud_config(apf=caa.apf_json("nginx-bad"), initdata=None, scratch=False) + (
        b"runcmd:\n  - [touch, /tmp/owned]\n"
    )

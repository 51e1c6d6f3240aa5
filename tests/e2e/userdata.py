"""User-data for the end-to-end boots, shaped like what cloud-api-adaptor sends.

CAA renders `#cloud-config` with a text template (clouds.md section 2.1): `write_files` entries with
`path` and a literal block `content: |` indented by 6 spaces, so every file arrives with exactly one
trailing newline.  initdata is a gzip+base64 TOML document whose `[data]` table holds aa.toml,
cdh.toml and policy.rego; the guest writes those files and `initdata.digest`, and extends PCR 8.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import tomllib
from dataclasses import dataclass

PEERPOD = "/run/peerpod"


def cloud_config(files: list[tuple[str, str]], extra: str = "") -> str:
    """Render CAA's template: `files` are (path, content) with content ending in one newline."""
    out = ["#cloud-config", "", "write_files:"]
    for path, content in files:
        out.append(f"  - path: {path}")
        if content:
            out.append("    content: |")
            out.extend("      " + line for line in content.removesuffix("\n").split("\n"))
    return "\n".join(out) + "\n" + extra


def apf_json(pod_name: str) -> str:
    """An apf.json like CAA's forwarder.Config, MarshalIndent with 4 spaces."""
    cfg = {
        "pod-network": {
            "podip": "10.244.1.19/24",
            "pod-hw-addr": "0e:8f:62:f3:81:ad",
            "interface": "eth0",
            "worker-node-ip": "10.224.0.4/16",
            "tunnel-type": "vxlan",
            "routes": [{"dst": "", "gw": "10.244.1.1", "dev": "eth0", "protocol": "boot", "scope": "universe"}],
            "neighbors": None,
            "mtu": 1450,
            "index": 1,
            "vxlan-port": 8472,
            "vxlan-id": 555001,
            "dedicated": False,
            "external-net-via-pod-vm": False,
        },
        "pod-namespace": "default",
        "pod-name": pod_name,
    }
    return json.dumps(cfg, indent=4) + "\n"


AUTH_JSON = json.dumps({"auths": {"registry.e2e.invalid": {"auth": base64.b64encode(b"user:pass").decode()}}}) + "\n"

AA_TOML = """[token_configs]
[token_configs.coco_as]
url = "http://127.0.0.1:8080"

[token_configs.kbs]
url = "http://127.0.0.1:8080"
"""
CDH_TOML = """socket = 'unix:///run/confidential-containers/cdh.sock'
credentials = []

[kbc]
name = 'cc_kbc'
url = 'http://127.0.0.1:8080'
"""
POLICY_REGO = """package agent_policy

default AddARPNeighborsRequest := true
default CreateContainerRequest := true
default ExecProcessRequest := false
"""


def initdata_toml(algorithm: str = "sha256") -> bytes:
    return (
        f'algorithm = "{algorithm}"\nversion = "0.1.0"\n\n[data]\n'
        f"\"aa.toml\" = '''\n{AA_TOML}'''\n\n"
        f"\"cdh.toml\" = '''\n{CDH_TOML}'''\n\n"
        f"\"policy.rego\" = '''\n{POLICY_REGO}'''\n"
    ).encode()


def encode_initdata(toml: bytes) -> str:
    """CAA's initdata.Encode: gzip, then standard base64 on one line."""
    return base64.b64encode(gzip.compress(toml, mtime=0)).decode()


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
    toml = initdata_toml()
    b64 = encode_initdata(toml)
    written = {
        "apf.json": apf_json(pod_name),
        "auth.json": AUTH_JSON,
        "initdata": b64 + "\n",
    }
    text = cloud_config([(f"{PEERPOD}/{k}", v) for k, v in written.items()])
    data = tomllib.loads(toml.decode())["data"]
    digest = hashlib.sha256(toml).hexdigest()
    files = {k: v.encode() for k, v in written.items()}
    files.update({k: v.encode() for k, v in data.items()})
    files["initdata.digest"] = digest.encode()
    return text.encode(), Expected(files, digest, pcr_after_extend(digest), f"default/{pod_name}")


def invalid() -> bytes:
    """A cloud-config with a key CAA's strict parser rejects (runcmd): the agent must refuse it."""
    text = cloud_config([(f"{PEERPOD}/apf.json", apf_json("nginx-bad"))], extra="runcmd:\n  - [touch, /tmp/owned]\n")
    return text.encode()

"""User-data shaped exactly like CAA's cloud-config template output (docs/protocols.md §2).

Used by the tests, the demo, the benchmark and the end-to-end test.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json

APF_CONFIG = {
    "pod-network": {
        "podip": "10.244.0.19/24",
        "pod-hw-addr": "0e:8f:62:f3:81:ad",
        "interface": "eth0",
        "worker-node-ip": "10.224.0.4/16",
        "tunnel-type": "vxlan",
        "routes": [{"dst": "", "gw": "10.244.0.1", "dev": "eth0", "protocol": "boot", "scope": "universe"}],
        "neighbors": None,
        "mtu": 1450,
        "index": 1,
        "vxlan-port": 8472,
        "vxlan-id": 555001,
        "dedicated": False,
        "external-net-via-pod-vm": False,
    },
    "pod-namespace": "default",
    "pod-name": "nginx-demo",
    "tls-server-key": "-----BEGIN PRIVATE KEY-----\nDemoKeyNotARealKeyJustForTests\n-----END PRIVATE KEY-----\n",
    "tls-server-cert": "-----BEGIN CERTIFICATE-----\nMIIBDemoCertificateForTests\n-----END CERTIFICATE-----\n",
}
AUTH_JSON = '{"auths":{"registry.example":{"auth":"ZGVtbzpkZW1v"}}}\n'

AA_TOML = """[token_configs]
[token_configs.coco_as]
url = "http://127.0.0.1:8080"

[token_configs.kbs]
url = "http://127.0.0.1:8080"
"""
CDH_TOML = """socket = "unix:///run/confidential-containers/cdh.sock"

[kbc]
name = "cc_kbc"
url = "http://127.0.0.1:8080"
"""
POLICY_REGO = """package agent_policy

default AllowRequestsFailingPolicy := true
"""


def initdata_toml(algorithm: str = "sha384", data: dict[str, str] | None = None) -> bytes:
    files = data if data is not None else {"aa.toml": AA_TOML, "cdh.toml": CDH_TOML, "policy.rego": POLICY_REGO}
    body = "".join(f"\"{name}\" = '''\n{content}'''\n" for name, content in files.items())
    return f'algorithm = "{algorithm}"\nversion = "0.1.0"\n\n[data]\n{body}'.encode()


def encode_initdata(toml: bytes) -> str:
    """CAA's initdata.Encode: gzip then base64 on one line."""
    return base64.b64encode(gzip.compress(toml, mtime=0)).decode()  # mtime 0: reproducible, as Go's encoder


def digest(toml: bytes, algorithm: str = "sha384") -> str:
    return hashlib.new(algorithm, toml).hexdigest()


def apf_json(pod_name: str | None = None) -> str:
    # json.MarshalIndent(cfg, "", "    "): 4-space indent, no trailing newline.
    return json.dumps({**APF_CONFIG, "pod-name": pod_name or APF_CONFIG["pod-name"]}, indent=4)


def _block(content: str) -> str:
    return "".join(f"      {line}\n" for line in content.rstrip("\n").split("\n"))


def cloud_config(
    *,
    apf: str | None = None,
    auth: str | None = AUTH_JSON,
    initdata: bytes | None = None,
    scratch: bool = True,
    extra_entries: str = "",
) -> bytes:
    """The template's output: `path` + `content: |` blocks, scratch marker without content."""
    apf = apf if apf is not None else apf_json()
    out = "#cloud-config\n\nwrite_files:\n"
    out += f"  - path: /run/peerpod/apf.json\n    content: |\n{_block(apf)}"
    if auth is not None:
        out += f"  - path: /run/peerpod/auth.json\n    content: |\n{_block(auth)}"
    if initdata is not None:
        out += f"  - path: /run/peerpod/initdata\n    content: |\n{_block(encode_initdata(initdata))}"
    if scratch:
        out += "  - path: /run/peerpod/scratch-space.marker\n"
    out += extra_entries
    return out.encode()


def expected_files(
    *, apf: str | None = None, auth: str | None = AUTH_JSON, initdata: bytes | None = None
) -> dict[str, bytes]:
    """What the agent must write for `cloud_config(...)` (YAML `|` gives one trailing newline)."""
    apf = apf if apf is not None else apf_json()
    out = {"/run/peerpod/apf.json": apf.rstrip("\n").encode() + b"\n", "/run/peerpod/scratch-space.marker": b""}
    if auth is not None:
        out["/run/peerpod/auth.json"] = auth.rstrip("\n").encode() + b"\n"
    if initdata is not None:
        out["/run/peerpod/initdata"] = encode_initdata(initdata).encode() + b"\n"
    return out


AZURE_DMI = {
    "sys_vendor": "Microsoft Corporation",
    "product_name": "Virtual Machine",
    "board_vendor": "Microsoft Corporation",
    "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77",
    "product_uuid": "4a1e2f3c-5b6d-4e7f-8a9b-0c1d2e3f4a5b",
}


def make_root(root: str, dmi: dict[str, str] | None = None) -> None:
    """A scratch guest root with DMI strings, as /sys/class/dmi/id would show them."""
    import os

    d = os.path.join(root, "sys/class/dmi/id")
    os.makedirs(d, exist_ok=True)
    for k, v in (dmi or {}).items():
        with open(os.path.join(d, k), "w") as f:
            f.write(v + "\n")

"""`make demo`: the real agent, end to end, against a local fake cloud, in a scratch root.

Starts fake metadata servers on 127.0.0.1 (Azure-shaped by default: IMDS + wireserver),
builds a guest root with that cloud's DMI strings, runs `guest-agent run --root DIR`
as a subprocess, then prints the files written and the stage timeline.  No root needed:
the pod netns and TPM steps are configured off for the demo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script

DMI = {
    "azure": caa.AZURE_DMI,
    "aws": {"sys_vendor": "Amazon EC2", "product_name": "m6i.large"},
    "gcp": {"sys_vendor": "Google", "product_name": "Google Compute Engine"},
    "alibaba": {"sys_vendor": "Alibaba Cloud", "product_name": "Alibaba Cloud ECS"},
    "ibmcloud": {"sys_vendor": "QEMU", "chassis_vendor": "IBM:Cloud Compute Server 1.0:Nitro"},
    "openstack": {"sys_vendor": "OpenStack Foundation", "product_name": "OpenStack Nova"},
}
URL_KEY = {"azure": "imds_url", "aws": "imds_url", "gcp": "metadata_url", "alibaba": "metadata_url"}


def agent_config(cloud: str, imds_url: str, wireserver_url: str | None) -> str:
    lines = ["[netns]", "enabled = false  # needs root", "", "[tpm]", "enabled = false", ""]
    lines += [f"[{cloud}]", f'{URL_KEY.get(cloud, "metadata_url")} = "{imds_url}"']
    if wireserver_url:
        lines.append(f'wireserver_url = "{wireserver_url}"')
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cloud", default="azure", choices=sorted(DMI))
    p.add_argument("--root", help="scratch root (default: a new temp dir)")
    args = p.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="guest-agent-demo-")
    caa.make_root(root, DMI[args.cloud])
    user_data = caa.cloud_config(initdata=caa.initdata_toml())

    servers = [FakeServer("imds", imds.FACTORIES[args.cloud](user_data, Script())).start()]
    ws_url = None
    if args.cloud == "azure":
        from tests.fakecloud.wireserver import FakeWireserver

        ws = FakeWireserver()
        servers.append(ws.server.start())
        ws_url = ws.server.url
    try:
        cfg = os.path.join(root, "demo-config.toml")
        with open(cfg, "w") as f:
            f.write(agent_config(args.cloud, servers[0].url, ws_url))
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        print(f"$ guest-agent run --root {root} --config {cfg}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "guest_agent", "run", "--root", root, "--config", cfg], env=env)
        print(f"exit code {rc}\n")
        print(f"{'file':44} {'mode':>5} {'bytes':>6}  sha256")
        for dirpath, _, names in sorted(os.walk(os.path.join(root, "run"))):
            for n in sorted(names):
                full = os.path.join(dirpath, n)
                st = os.lstat(full)
                with open(full, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
                print(f"{'/' + os.path.relpath(full, root):44} {st.st_mode & 0o7777:05o} {st.st_size:6}  {digest}")
        print()
        subprocess.call([sys.executable, "-m", "guest_agent", "timeline", "--root", root])
        if args.cloud == "azure":
            reports = [json.loads(r.body) for r in servers[1].requests if r.method == "POST" and r.body[:1] == b"{"]
            print(f"\nwireserver received: {reports or [r.raw_path for r in servers[1].requests]}")
        return rc
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())

"""The fake Azure fabric for the boot benchmark: enough of IMDS, the wireserver and the HostGAPlugin
for every variant (guest-agent, cloud-init 22.4 + waagent 2.7.3, CAA's chain, no agent).

The shared fakes (tests/fakecloud) serve what guest-agent uses.  The incumbents need more:
- cloud-init's Azure datasource reads `/metadata/instance?api-version=2021-08-01&extended=true`
  (JSON, docs/protocols.md §5), then goal state and XML health (§5);
- waagent 2.7.3 calls `/?comp=versions` (§5), fetches every config URL of the goal state
  (HostingEnvironmentConfig, SharedConfig, ExtensionsConfig, Certificates: §5), reads
  `/metadata/instance/compute` (§5), uploads its status blob and asks the HostGAPlugin on port
  32526 for `/vmSettings`, which must answer 404 ("not supported": docs/protocols.md §5) or the agent hits
  an error path that breaks on Python 3.11.
Every request is logged with its host arrival time (`Request.t`), which gives the milestones.

`/bench/settled` (on the wireserver address) is the benchmark's own: the guest's report unit calls
it and it answers once the variant's last expected health report has arrived (or on a deadline),
so CPU and memory are read once provisioning is over, not at an arbitrary moment.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Reply, Request, Script
from tests.fakecloud.wireserver import FakeWireserver, HealthReport, goal_state_xml

XML = {"Content-Type": "text/xml; charset=utf-8"}
JSON = {"Content-Type": "application/json; charset=utf-8"}
WIRE = "http://168.63.129.16:80"

SUPPORTED_VERSIONS = ("2015-04-05", "2012-11-30", "2012-09-15", "2012-05-15", "2011-12-31")
VERSIONS_XML = (
    '<?xml version="1.0" encoding="utf-8"?>\n<Versions><Preferred><Version>2015-04-05</Version></Preferred>'
    "<Supported>" + "".join(f"<Version>{v}</Version>" for v in SUPPORTED_VERSIONS) + "</Supported></Versions>\n"
)


def agent_of(req: Request) -> str:
    """Which agent sent a request: User-Agent tells cloud-init from waagent (both send
    x-ms-agent-name: WALinuxAgent, docs/protocols.md §5)."""
    ua = (req.header("user-agent") or "").lower()
    if "walinuxagent" in ua:
        return "waagent"
    if "cloud-init" in ua:
        return "cloud-init"
    if "guest-agent" in ua or "guest-agent" in (req.header("x-ms-guest-agent-name") or "").lower():
        return "guest-agent"
    if (req.header("x-ms-agent-name") or "").lower() == "azure-ready":
        return "azure-ready"  # CAA's azure-ready (Go's default User-Agent)
    return ua.split("/")[0] or "unknown"


def ovf_env_xml(user_data: bytes, hostname: str = "podvm", username: str = "azureuser") -> bytes:
    """The provisioning ISO's ovf-env.xml, CustomData carrying the user-data (base64)."""
    custom = base64.b64encode(user_data).decode()
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1"'
        ' xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"'
        ' xmlns:wa="http://schemas.microsoft.com/windowsazure"'
        ' xmlns:i="http://www.w3.org/2001/XMLSchema-instance">\n'
        " <wa:ProvisioningSection><wa:Version>1.0</wa:Version>\n"
        '  <LinuxProvisioningConfigurationSet xmlns="http://schemas.microsoft.com/windowsazure">\n'
        "   <ConfigurationSetType>LinuxProvisioningConfiguration</ConfigurationSetType>\n"
        f"   <HostName>{hostname}</HostName>\n   <UserName>{username}</UserName>\n"
        "   <DisableSshPasswordAuthentication>true</DisableSshPasswordAuthentication>\n"
        f"   <CustomData>{custom}</CustomData>\n"
        "  </LinuxProvisioningConfigurationSet>\n </wa:ProvisioningSection>\n"
        " <wa:PlatformSettingsSection><wa:Version>1.0</wa:Version>\n"
        '  <PlatformSettings xmlns="http://schemas.microsoft.com/windowsazure">\n'
        "   <KmsServerHostname>kms.core.windows.net</KmsServerHostname>\n"
        "   <ProvisionGuestAgent>true</ProvisionGuestAgent>\n"
        '   <GuestAgentPackageName i:nil="true" />\n'
        "   <PreprovisionedVm>false</PreprovisionedVm>\n"
        "  </PlatformSettings>\n </wa:PlatformSettingsSection>\n</Environment>\n"
    ).encode()


def instance_doc(vm_id: str, user_data: bytes, mac: str) -> dict[str, Any]:
    """/metadata/instance (extended): what cloud-init 22.4 reads; userData as IMDS has it."""
    compute = {
        "azEnvironment": "AzurePublicCloud",
        "location": "eastus",
        "name": "podvm-nginx-6b8f9",
        "offer": "",
        "osType": "Linux",
        "osProfile": {
            "adminUsername": "azureuser",
            "computerName": "podvm",
            "disablePasswordAuthentication": "true",
        },
        "publicKeys": [
            {
                "keyData": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchBenchBenchBenchBenchBenchBenchBench bench",
                "path": "/home/azureuser/.ssh/authorized_keys",
            }
        ],
        "resourceGroupName": "peerpods",
        "subscriptionId": "00000000-0000-0000-0000-000000000000",
        "tagsList": [],
        "userData": base64.b64encode(user_data).decode(),
        "vmId": vm_id,
        "vmSize": "Standard_DC2as_v5",
        "zone": "",
    }
    iface = {
        "ipv4": {
            "ipAddress": [{"privateIpAddress": "168.0.0.4", "publicIpAddress": ""}],
            "subnet": [{"address": "168.0.0.0", "prefix": "7"}],
        },
        "ipv6": {"ipAddress": []},
        "macAddress": mac.replace(":", "").upper(),
    }
    return {"compute": compute, "network": {"interface": [iface]}, "extended": {"compute": {"ppsType": "None"}}}


def _gs_config(container_id: str, instance_id: str, incarnation: str) -> bytes:
    base = f"{WIRE}/machine/{container_id}/{instance_id}"
    return f"<Certificates>{base}?comp=certificates&amp;incarnation={incarnation}</Certificates>".encode()


def goal_state_with_certificates(incarnation: str, container_id: str, instance_id: str) -> bytes:
    """The shared fake's goal state plus the Certificates URL waagent expects to resolve."""
    doc = goal_state_xml(incarnation, container_id, instance_id)
    return doc.replace(b"<ConfigName>", _gs_config(container_id, instance_id, incarnation) + b"<ConfigName>")


def config_xml(kind: str, incarnation: str, instance: str) -> str:
    deployment = (
        '<Deployment name="0f7e2a1c5b3d4e6f8a9b0c1d2e3f4a5b" guid="{5d3c1b2a-0f9e-4d8c-b7a6-958473625140}"'
        ' incarnation="0" isNonCancellableTopologyChangeEnabled="false">'
        '<Service name="podvm" guid="{00000000-0000-0000-0000-000000000000}" />'
        '<ServiceInstance name="0f7e2a1c5b3d4e6f8a9b0c1d2e3f4a5b.0" guid="{9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d}" />'
        "</Deployment>"
        f'<Incarnation number="{incarnation}" instance="{instance}" guid="{{1b2c3d4e-5f60-4718-92a3-b4c5d6e7f809}}" />'
        '<Role guid="{2c3d4e5f-6071-4829-a3b4-c5d6e7f80910}" name="podvm" settleTimeSeconds="0" />'
    )
    if kind == "hostingEnvironmentConfig":
        return (
            f'<?xml version="1.0" encoding="utf-8"?>\n<HostingEnvironmentConfig version="1.0.0.0"'
            f' goalStateIncarnation="{incarnation}"><StoredCertificates />{deployment}'
            '<HostingEnvironmentSettings name="full"><CAS mode="full" /><PrivilegeLevel mode="max" />'
            "</HostingEnvironmentSettings><ApplicationSettings /><ResourceReferences />"
            "</HostingEnvironmentConfig>\n"
        )
    if kind == "sharedConfig":
        return (
            f'<?xml version="1.0" encoding="utf-8"?>\n<SharedConfig version="1.0.0.0"'
            f' goalStateIncarnation="{incarnation}">{deployment}<Instances>'
            f'<Instance id="{instance}" address="168.0.0.4"><FaultDomains randomId="0" updateId="0"'
            ' updateCount="0" /><InputEndpoints /></Instance></Instances></SharedConfig>\n'
        )
    if kind == "extensionsConfig":
        # No extensions, no agent families to update to; the status blob goes back to this fake.
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n<Extensions version="1.0.0.0"'
            f' goalStateIncarnation="{incarnation}"><GuestAgentExtension'
            ' xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><GAFamilies /></GuestAgentExtension>'
            f'<StatusUploadBlob statusBlobType="BlockBlob">{WIRE}/bench/statusblob</StatusUploadBlob>'
            "<Plugins /><PluginSettings /></Extensions>\n"
        )
    # fullConfig: nobody reads it; an empty but well-formed document.
    return f'<?xml version="1.0" encoding="utf-8"?>\n<FullConfig goalStateIncarnation="{incarnation}" />\n'


CERTIFICATES_NONE = (
    '<?xml version="1.0" encoding="utf-8"?>\n<CertificateFile xmlns:i="http://www.w3.org/2001/XMLSchema-instance"'
    ' i:noNamespaceSchemaLocation="certificates10.xsd"><Version>2012-11-30</Version>'
    "<Incarnation>1</Incarnation><Format>Pkcs7BlobWithPfxContents</Format></CertificateFile>\n"
)


class BenchWireserver(FakeWireserver):
    """The shared fake wireserver plus the routes waagent needs and the benchmark's /bench/settled."""

    def __init__(
        self, settled: Callable[[list[HealthReport]], bool], settle_deadline: float, log: IO[str] | None = None
    ) -> None:
        # Every version /?comp=versions lists as Supported is accepted, as the real wireserver does:
        # waagent and cloud-init send 2012-11-30, CAA's azure-ready negotiates 2015-04-05.
        super().__init__(log=log, goal_state_xml=goal_state_with_certificates, versions=SUPPORTED_VERSIONS)
        self.settled = settled
        self.settle_deadline = settle_deadline  # time.time() after which /bench/settled answers anyway
        self.settled_at: float | None = None

    def _answer(self, req: Request) -> Reply:
        comp = (req.query.get("comp") or [""])[0]
        if req.path == "/bench/settled":
            return self._settle()
        if req.path == "/HealthService":
            return Reply(200, "")  # waagent's health-service observations (telemetry only)
        if req.path.startswith("/bench/statusblob"):
            return Reply(201, "")
        if req.path == "/" and comp == "versions":
            return Reply(200, VERSIONS_XML, XML)
        if req.path.startswith("/machine/") and req.path.count("/") >= 3:
            if comp == "config":
                kind = (req.query.get("type") or [""])[0]
                inc = (req.query.get("incarnation") or ["1"])[0]
                return Reply(200, config_xml(kind, inc, self.instance_id), XML)
            if comp == "certificates":
                return Reply(200, CERTIFICATES_NONE, XML)
        if req.path in ("/machine", "/machine/") and comp in ("telemetrydata", "roleProperties"):
            return Reply(200 if comp == "telemetrydata" else 202, "")
        return super()._answer(req)

    def _settle(self) -> Reply:
        def done() -> bool:
            return self.settled(self.accepted())

        while not done() and time.time() < self.settle_deadline:
            self.server.wait_for(lambda _r: done(), timeout_s=min(1.0, max(0.05, self.settle_deadline - time.time())))
        self.settled_at = time.time()
        return Reply(200, "settled" if done() else "deadline")


@dataclass
class Event:
    t: float  # host time.time() on arrival
    server: str
    method: str
    path: str
    status: int | None
    agent: str
    state: str | None = None  # health reports: Ready / NotReady


class BenchFabric:
    """IMDS (port A), wireserver :80 (port B), HostGAPlugin :32526 (port C), all on 127.0.0.1."""

    def __init__(
        self,
        user_data: bytes,
        vm_id: str,
        settled: Callable[[list[HealthReport]], bool],
        settle_deadline: float,
        mac: str = "52:54:00:12:34:56",
        log: IO[str] | None = None,
    ) -> None:
        self.user_data = user_data
        self.doc = instance_doc(vm_id, user_data, mac)
        self._userdata_handler = imds.azure(user_data, Script())
        self.imds = FakeServer("imds", self._imds, log=log)
        self.wire = BenchWireserver(settled, settle_deadline, log=log)
        self.hgap = FakeServer("hostgaplugin", self._hgap, log=log)
        self._status: dict[int, int | None] = {}  # id(Request) -> the status it was answered with
        for srv in (self.imds, self.wire.server, self.hgap):
            srv.handler = self._recording(srv.handler)

    def _recording(self, handler: Callable[[Request], Reply]) -> Callable[[Request], Reply]:
        def handle(req: Request) -> Reply:
            reply = handler(req)
            self._status[id(req)] = None if reply.drop else reply.status
            return reply

        return handle

    def start(self) -> BenchFabric:
        self.imds.start()
        self.wire.start()
        self.hgap.start()
        return self

    def stop(self) -> None:
        for s in (self.imds, self.hgap):
            s.stop()
        self.wire.stop()

    @property
    def ports(self) -> dict[str, int]:
        return {"imds": self.imds.port, "wire": self.wire.server.port, "hgap": self.hgap.port}

    def _imds(self, req: Request) -> Reply:
        if req.path == "/metadata/instance/compute/userData":
            return self._userdata_handler(req)  # the shared fake: header and api-version checks
        if (req.header("metadata") or "").lower() != "true" or req.header("x-forwarded-for") is not None:
            return Reply(400, json.dumps({"error": "Bad request. Required metadata header not specified"}), JSON)
        if not req.query.get("api-version"):
            return Reply(400, json.dumps({"error": "Bad request. api-version was not specified"}), JSON)
        if req.path == "/metadata/reprovisiondata":
            return Reply(404, "Not Found")  # not a pre-provisioned VM
        if req.path.startswith("/metadata/instance"):
            node: Any = self.doc
            for part in [p for p in req.path[len("/metadata/instance") :].split("/") if p]:
                if isinstance(node, dict) and part in node:
                    node = node[part]
                else:
                    return Reply(404, json.dumps({"error": "Not found"}), JSON)
            if (req.query.get("format") or [""])[0] == "text" and not isinstance(node, (dict, list)):
                return Reply(200, str(node), {"Content-Type": "text/plain; charset=utf-8"})
            return Reply(200, json.dumps(node), JSON)
        return Reply(404, json.dumps({"error": "Not found"}), JSON)

    @staticmethod
    def _hgap(req: Request) -> Reply:
        # HostGAPlugin: vmSettings unsupported (404), health and status uploads accepted.
        if req.path == "/vmSettings":
            return Reply(404, "")
        if req.path == "/health":
            return Reply(200, "")
        if req.method == "PUT":
            return Reply(200, "")
        return Reply(404, "")

    def events(self) -> list[Event]:
        out: list[Event] = []
        for name, srv in (("imds", self.imds), ("wire", self.wire.server), ("hgap", self.hgap)):
            for r in list(srv.requests):
                out.append(Event(r.t, name, r.method, r.raw_path, self._status.get(id(r)), agent_of(r)))
        states = {id(rep.request): rep.state for rep in self.wire.reports}
        by_t = {(e.server, e.t, e.path): e for e in out}
        for r in self.wire.server.requests:
            if id(r) in states:
                by_t[("wire", r.t, r.raw_path)].state = states[id(r)]
        return sorted(out, key=lambda e: e.t)

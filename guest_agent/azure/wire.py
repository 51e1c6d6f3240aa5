"""WireServer protocol, pure: goal-state parse, health report builders, DHCP option 245.

Two health endpoints exist:

* ``json``: ``POST /provisioning/health`` with ``{"state": "Ready"}``: one request, no goal state
  (azure-init since Azure/azure-init PR #188);
* ``xml``: ``GET /machine/?comp=goalstate`` for (incarnation, container id, role instance id),
  then ``POST /machine?comp=health`` with the Health XML (WALinuxAgent
  azurelinuxagent/common/protocol/wire.py, cloud-init cloudinit/sources/helpers/azure.py,
  afterburn src/providers/microsoft/azure, CAA cmd/azure-ready).

Nothing here does I/O except `wireserver_address`, which reads networkd's lease files.
"""

from __future__ import annotations

import html
import ipaddress
import json
import os
import re
from dataclasses import dataclass

from guest_agent import __version__
from guest_agent.errors import FabricError

# "used in all regions and all national clouds ... will not change" (Microsoft Learn,
# "What is IP address 168.63.129.16?").
DEFAULT_WIRESERVER = "168.63.129.16"
# Every agent and the "no agent" doc send 2012-11-30; version negotiation (?comp=versions) is skipped.
MS_VERSION = "2012-11-30"
DEFAULT_AGENT_NAME = f"guest-agent/{__version__}"

JSON_HEALTH_PATH = "/provisioning/health"
GOAL_STATE_PATH = "/machine/?comp=goalstate"  # WALinuxAgent's spelling; /machine?comp=... works too
XML_HEALTH_PATH = "/machine?comp=health"

READY = "Ready"
NOT_READY = "NotReady"
PROVISIONING_FAILED = "ProvisioningFailed"

# cloud-init's HEALTH_REPORT_DESCRIPTION_TRIM_LEN; WALinuxAgent allows 3686, the host ~4096 bytes.
DESCRIPTION_MAX_CHARS = 512
# A goal state is ~2 KiB; the host is untrusted, so its size and shape are bounded.
GOAL_STATE_MAX_BYTES = 256 * 1024
GOAL_STATE_MAX_DEPTH = 32
GOAL_STATE_MAX_ELEMENTS = 10_000
GOAL_STATE_MAX_ID_CHARS = 4096  # an id is short; a longer one is cut there, never buffered whole


@dataclass(frozen=True, slots=True)
class GoalState:
    """The three values a health report echoes."""

    incarnation: str
    container_id: str
    role_instance_id: str


class GoalStateIncomplete(FabricError):
    """The goal state has no RoleInstance yet: the client reads it again (WALinuxAgent does too)."""


class _Refused(Exception):
    """Raised from inside an expat handler to stop the parse."""

    def __init__(self, reason: str, **data: object) -> None:
        super().__init__(reason)
        self.reason = reason
        self.data = data


_INCARNATION = ("GoalState", "Incarnation")
_CONTAINER_ID = ("GoalState", "Container", "ContainerId")
_ROLE = ("GoalState", "Container", "RoleInstanceList", "RoleInstance")
_INSTANCE_ID = (*_ROLE, "InstanceId")


def parse_goal_state(xml: bytes) -> GoalState:
    """The three values a health report echoes, by path; namespaces and unknown elements ignored.

    A streaming expat parse (no tree, no recursion) bounded in size, depth and element count; a
    DTD (and so any entity) is refused: a goal state never has one.  Raises `GoalStateIncomplete`
    when no RoleInstance is there yet, `FabricError` for everything else, and nothing else.
    """
    if len(xml) > GOAL_STATE_MAX_BYTES:
        raise FabricError("the wireserver goal state is too large", size=len(xml), limit_bytes=GOAL_STATE_MAX_BYTES)
    if xml.startswith(b"\xef\xbb\xbf"):
        xml = xml[3:]  # WALinuxAgent strips a BOM from wireserver bodies (textutil.remove_bom)
    from xml.parsers import expat

    path: list[str] = []
    found: dict[tuple[str, ...], list[str]] = {}
    roles = [0]
    elements = [0]

    def start(name: str, _attrs: object) -> None:
        elements[0] += 1
        if elements[0] > GOAL_STATE_MAX_ELEMENTS:
            raise _Refused("the wireserver goal state has too many elements", limit=GOAL_STATE_MAX_ELEMENTS)
        if len(path) >= GOAL_STATE_MAX_DEPTH:
            raise _Refused("the wireserver goal state is nested too deeply", limit=GOAL_STATE_MAX_DEPTH)
        local = name.rsplit("}", 1)[-1]
        if not path and local != "GoalState":
            raise _Refused("the wireserver answer is not a GoalState document", root=local[:40])
        path.append(local)
        key = tuple(path)
        if key == _ROLE:
            roles[0] += 1
        elif key in (_INCARNATION, _CONTAINER_ID) or (key == _INSTANCE_ID and roles[0] == 1):
            found.setdefault(key, [])

    def end(_name: str) -> None:
        path.pop()

    def text(data: str) -> None:
        key = tuple(path)
        if key in found and (key != _INSTANCE_ID or roles[0] == 1):
            parts = found[key]
            # Cut the piece itself: expat may hand over a whole 200 KiB text in one call.
            left = GOAL_STATE_MAX_ID_CHARS - sum(map(len, parts))
            if left > 0:
                parts.append(data[:left])

    def refuse_dtd(*_args: object) -> None:
        raise _Refused("the wireserver goal state carries a DTD, which it never should")

    # UTF-8 whatever the document declares: a made-up encoding name raised LookupError.
    p = expat.ParserCreate(encoding="utf-8", namespace_separator="}")
    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = text
    p.StartDoctypeDeclHandler = refuse_dtd
    p.EntityDeclHandler = refuse_dtd
    try:
        p.Parse(xml, True)
    except _Refused as exc:
        raise FabricError(exc.reason, **exc.data) from None
    except (expat.ExpatError, LookupError, UnicodeError) as exc:
        raise FabricError("the wireserver goal state is not well-formed XML", error=str(exc)[:200]) from None

    def value(key: tuple[str, ...]) -> str | None:
        v = "".join(found.get(key, [])).strip()
        return v or None

    incarnation, container_id = value(_INCARNATION), value(_CONTAINER_ID)
    if incarnation is None or container_id is None:
        missing = "Incarnation" if incarnation is None else "Container/ContainerId"
        raise FabricError("the wireserver goal state lacks a required element", element=missing)
    if roles[0] == 0:
        raise GoalStateIncomplete("the wireserver goal state has no RoleInstance yet")
    instance_id = value(_INSTANCE_ID)  # of the first RoleInstance, as afterburn does
    if instance_id is None:
        raise FabricError("the wireserver goal state lacks a required element", element="RoleInstance/InstanceId")
    return GoalState(incarnation=incarnation, container_id=container_id, role_instance_id=instance_id)


def escape(text: str) -> str:
    """XML character data: &, < and > as entities (xml.sax.saxutils.escape is the same three, but
    imports urllib.request, http.client and ssl)."""
    return html.escape(text, quote=False)


# What XML 1.0 cannot carry at all, even escaped (the complement of its Char production): C0
# controls but tab, LF and CR; surrogates; U+FFFE and U+FFFF.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def clean_description(text: str) -> str:
    """Trim to 512 characters, then replace what XML cannot carry by spaces (one for one)."""
    return _NOT_XML_CHAR.sub(" ", text[:DESCRIPTION_MAX_CHARS])


def _check_state(state: str, substatus: str | None, description: str | None) -> None:
    if state not in (READY, NOT_READY):
        raise ValueError(f"health state must be Ready or NotReady, not {state!r}")
    if state == READY and (substatus is not None or description is not None):
        raise ValueError("a Ready report carries no details")


def build_health_xml(gs: GoalState, state: str, substatus: str | None = None, description: str | None = None) -> bytes:
    """The Health document for POST /machine?comp=health; ids and text escaped."""
    _check_state(state, substatus, description)
    details = ""
    if substatus is not None:
        desc = escape(clean_description(description or ""))
        details = f"<Details><SubStatus>{escape(substatus)}</SubStatus><Description>{desc}</Description></Details>"
    doc = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Health xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
        f"<GoalStateIncarnation>{escape(gs.incarnation)}</GoalStateIncarnation>"
        f"<Container><ContainerId>{escape(gs.container_id)}</ContainerId>"
        f"<RoleInstanceList><Role><InstanceId>{escape(gs.role_instance_id)}</InstanceId>"
        f"<Health><State>{state}</State>{details}</Health>"
        "</Role></RoleInstanceList></Container></Health>\n"
    )
    return doc.encode("utf-8")


def build_health_json(state: str, substatus: str | None = None, description: str | None = None) -> bytes:
    """The body for POST /provisioning/health."""
    _check_state(state, substatus, description)
    doc: dict[str, object] = {"state": state}
    if substatus is not None:
        doc["details"] = {"subStatus": substatus, "description": clean_description(description or "")}
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


_HEX_U32 = re.compile("[0-9A-Fa-f]{8}")


def parse_option_245(value: str) -> str | None:
    """DHCP option 245 as systemd-networkd (``A83F8110``) or NetworkManager (``a8:3f:81:10``) store it.

    Big-endian u32 (afterburn src/util/dhcp.rs); a 1-digit pair is zero-padded like cloud-init's
    `get_ip_from_lease_value` does.  Returns None when the value is not an address.
    """
    v = value.strip()
    if ":" in v:
        parts = v.split(":")
        if len(parts) != 4 or not all(1 <= len(p) <= 2 for p in parts):
            return None
        v = "".join(p.zfill(2) for p in parts)
    if not _HEX_U32.fullmatch(v):
        return None
    n = int(v, 16)
    return None if n in (0, 0xFFFFFFFF) else str(ipaddress.IPv4Address(n))


def wireserver_address(lease_dir: str, default: str = DEFAULT_WIRESERVER) -> str:
    """OPTION_245 from systemd-networkd's lease files ``<lease_dir>/<ifindex>``, else `default`.

    Reads what is there right now and never waits: the constant is correct on every Azure
    region, the lease only matters for unusual fabrics.
    """
    try:
        names = [e.name for e in os.scandir(lease_dir) if e.name.isascii() and e.name.isdigit() and e.is_file()]
    except OSError:
        return default
    for name in sorted(names, key=int):
        try:
            with open(os.path.join(lease_dir, name), encoding="utf-8", errors="replace") as f:
                text = f.read(64 * 1024)
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "OPTION_245":
                addr = parse_option_245(value)
                if addr is not None:
                    return addr
    return default

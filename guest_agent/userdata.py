"""User-data: decode, parse `#cloud-config`, validate against the allow-list, plan the writes.

Pure functions only.  The host that supplies user-data is untrusted, so the accepted
language is deliberately tiny: a `#cloud-config` document whose only key is
`write_files`, each entry with `path`, `content`, `encoding`, `permissions`, `owner`.
Anything else (`runcmd`, `bootcmd`, ...) rejects the whole document: the agent never
executes anything from user-data.  One bad entry rejects everything (exit 78), and
`plan()` has decided every byte before `files.apply()` writes any.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from guest_agent import codec, initdata
from guest_agent.config import Config
from guest_agent.errors import UserDataInvalid
from guest_agent.files import FileSpec

HEADER = "#cloud-config"
ENTRY_KEYS = frozenset({"path", "content", "encoding", "permissions", "owner"})
INITDATA_PATH = "initdata"  # under files.peerpod_dir

# cloud-init's write_files encodings (cloudinit/config/cc_write_files.py), minus nothing.
_ENCODINGS: dict[str, tuple[str, ...]] = {
    "text/plain": (),
    "b64": ("b64",),
    "base64": ("b64",),
    "gz": ("gz",),
    "gzip": ("gz",),
    "gz+b64": ("b64", "gz"),
    "gz+base64": ("b64", "gz"),
    "gzip+b64": ("b64", "gz"),
    "gzip+base64": ("b64", "gz"),
}


@dataclass(frozen=True)
class Plan:
    """Everything a run will write, decided before anything is written."""

    files: tuple[FileSpec, ...]
    initdata: initdata.Initdata
    initdata_is_default: bool


def _load_yaml(text: str) -> Any:
    import yaml  # ~20 ms; libyaml's C loader when available

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # a safe loader: no Python object tags
    except yaml.YAMLError as exc:
        raise UserDataInvalid("user-data is not valid YAML", error=str(exc).splitlines()[0]) from exc


def decode(raw: bytes, cfg: Config) -> str:
    """Size-check, peel optional gzip/base64 layers, require UTF-8 `#cloud-config` text."""
    if len(raw) > cfg.limits.max_user_data_bytes:
        raise UserDataInvalid(
            "user-data is larger than the size limit", size=len(raw), limit_bytes=cfg.limits.max_user_data_bytes
        )
    data = codec.unwrap_layers(raw, limit=cfg.limits.max_decoded_bytes, what="user-data")
    if len(data) > cfg.limits.max_decoded_bytes:
        raise UserDataInvalid("user-data is larger than the size limit", limit_bytes=cfg.limits.max_decoded_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserDataInvalid("user-data is not UTF-8 text", offset=exc.start) from exc
    text = text.removeprefix("\ufeff")
    if text.split("\n", 1)[0].rstrip() != HEADER:
        raise UserDataInvalid("user-data is not a #cloud-config document (first line must be #cloud-config)")
    return text


def normalise_path(path: Any, index: int) -> str:
    if not isinstance(path, str) or not path:
        raise UserDataInvalid("write_files entry has no path string", entry=index)
    if "\0" in path or not path.startswith("/"):
        raise UserDataInvalid("write_files path must be absolute", entry=index, path=path[:200])
    norm = posixpath.normpath(path)
    if norm != path or "/../" in f"{path}/" or "/./" in f"{path}/" or norm.startswith("//"):
        raise UserDataInvalid("write_files path is not normalised", entry=index, path=path[:200])
    return norm


def _mode(value: Any, index: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise UserDataInvalid("write_files permissions must be an octal mode", entry=index)
    if isinstance(value, int):  # YAML 1.1 reads 0644 as octal already
        mode = value
    elif isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise UserDataInvalid("write_files permissions must be an octal mode", entry=index) from None
    else:
        raise UserDataInvalid("write_files permissions must be an octal mode", entry=index)
    if not 0 <= mode <= 0o777:  # no setuid/setgid/sticky from an untrusted host
        raise UserDataInvalid("write_files permissions out of range (0000-0777)", entry=index, mode=oct(mode))
    return mode


def _owner(value: Any, index: int) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    if not isinstance(value, str) or value.count(":") > 1 or not value:
        raise UserDataInvalid("write_files owner must be 'user' or 'user:group'", entry=index)
    user, _, group = value.partition(":")
    import grp
    import pwd

    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        gid = (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid) if group else None
    except KeyError:
        raise UserDataInvalid("write_files owner names an unknown user or group", entry=index, owner=value) from None
    return uid, gid


def _content(entry: dict[str, Any], index: int, cfg: Config) -> bytes:
    content = entry.get("content", "")
    if content is None:
        content = ""
    encoding = entry.get("encoding", "text/plain")
    if not isinstance(encoding, str) or encoding.lower() not in _ENCODINGS:
        raise UserDataInvalid("write_files encoding is not supported", entry=index, encoding=str(encoding)[:40])
    if isinstance(content, str):
        data = content.encode("utf-8")
    elif isinstance(content, bytes):  # YAML !!binary
        data = content
    else:
        raise UserDataInvalid("write_files content must be a string", entry=index)
    what = f"write_files entry {index}"
    for layer in _ENCODINGS[encoding.lower()]:
        if layer == "b64":
            data = codec.b64decode_strict(data, what=what)
        else:
            data = codec.gunzip_bounded(data, limit=cfg.limits.max_file_bytes, what=what)
    if len(data) > cfg.limits.max_file_bytes:
        raise UserDataInvalid("write_files content is larger than the size limit", entry=index, size=len(data))
    return data


def parse(text: str, cfg: Config) -> list[FileSpec]:
    """The write_files entries of a decoded #cloud-config document, fully validated."""
    doc = _load_yaml(text)
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise UserDataInvalid("user-data must be a YAML mapping")
    unknown = sorted(str(k) for k in doc if k != "write_files")
    if unknown:
        raise UserDataInvalid("user-data has keys the agent refuses (only write_files)", keys=",".join(unknown)[:200])
    entries = doc.get("write_files") or []
    if not isinstance(entries, list):
        raise UserDataInvalid("write_files must be a list")
    allowed = frozenset(cfg.files.allowed_paths)
    specs: list[FileSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserDataInvalid("write_files entry must be a mapping", entry=i)
        extra = sorted(str(k) for k in entry if k not in ENTRY_KEYS)
        if extra:
            raise UserDataInvalid("write_files entry has unsupported keys", entry=i, keys=",".join(extra)[:200])
        path = normalise_path(entry.get("path"), i)
        if path not in allowed:
            raise UserDataInvalid("write_files path is not on the allow-list", entry=i, path=path[:200])
        if path in seen:
            raise UserDataInvalid("write_files lists a path twice", entry=i, path=path)
        seen.add(path)
        uid, gid = _owner(entry.get("owner"), i)
        specs.append(
            FileSpec(
                path, _content(entry, i, cfg), _mode(entry.get("permissions"), i, cfg.files.default_mode), uid, gid
            )
        )
    return specs


def plan(raw: bytes, cfg: Config) -> Plan:
    """raw user-data -> every file to write, including what initdata holds and its digest."""
    specs = parse(decode(raw, cfg), cfg)
    peerpod = cfg.files.peerpod_dir
    initdata_path = posixpath.join(peerpod, INITDATA_PATH)
    by_path = {s.path: s for s in specs}
    given = by_path.get(initdata_path)
    if given is not None:
        toml = initdata.decode_file(given.content, limit=cfg.limits.max_decoded_bytes)
        is_default = False
    else:
        # CAA's dummy initdata, so aa.toml always exists (attestation-agent.path waits for it).
        toml = initdata.DEFAULT_INITDATA_TOML
        is_default = True
        by_path[initdata_path] = FileSpec(
            initdata_path, initdata.encode_file(toml), cfg.files.default_mode, source="agent"
        )
    idata = initdata.parse(toml)
    # initdata is applied after write_files in CAA, so its aa.toml/cdh.toml win.
    for name, content in idata.files:
        p = posixpath.join(peerpod, name)
        by_path[p] = FileSpec(p, content, cfg.files.default_mode, source="initdata")
    digest_path = posixpath.join(peerpod, "initdata.digest")
    by_path[digest_path] = FileSpec(digest_path, idata.digest_hex.encode(), 0o644, source="agent")
    return Plan(
        files=tuple(by_path.values()),
        initdata=idata,
        initdata_is_default=is_default,
    )

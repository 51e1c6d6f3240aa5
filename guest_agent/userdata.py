"""User-data: decode, parse `#cloud-config`, validate against the allow-list, plan the writes.

Pure functions (their only side effect is a warning per skipped entry).  The host that supplies
user-data is untrusted, so the accepted language is deliberately tiny: a YAML mapping (the
`#cloud-config` first line is optional, as in CAA's `process-user-data`) whose only key is
`write_files`, each entry with `path`, `content`, `encoding`, `permissions`.  Anything else
(`runcmd`, `bootcmd`, ...) rejects the whole document: the agent never executes anything from
user-data.  The YAML is read by `safeyaml` (bounded depth and node count, no anchors, aliases,
merge keys or foreign tags), so no document can crash or exhaust the agent.

Compatibility with CAA (cloud-api-adaptor `pkg/userdata/provision.go`, `pkg/initdata/initdata.go`):
with `files.strict = false` (the default) a well-formed, absolute, normalised path that is not on
the allow-list is skipped with a warning, as CAA does (older CAA releases sent
`/run/peerpod/agent-config.toml` and `/run/peerpod/daemon.json`), and so is an initdata `[data]`
key that is a plain file name outside aa.toml/cdh.toml/policy.rego.  `files.strict = true`
refuses such documents whole.  Everything malformed is refused whole (exit 78) either way: YAML
errors, unknown keys, wrong types, relative, traversing or non-normalised paths.  `plan()` has
decided every byte before `files.apply()` writes any.

`owner:` is refused (exit 78), in `check` and `run` alike: the unit runs without CAP_CHOWN and
its seccomp filter (`~@privileged`) denies the chown family, so an owner could never be applied;
CAA's own reader (yaml.v2 `UnmarshalStrict` into `{path, content}`) rejects the key too.  Every
file belongs to the agent's user (root), mode 0600.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guest_agent import codec, initdata, safeyaml
from guest_agent.config import Config
from guest_agent.errors import UserDataInvalid, field_of, show
from guest_agent.files import FileSpec
from guest_agent.log import fields, logger

if TYPE_CHECKING:
    from guest_agent.initdata import Initdata

log = logger("guest_agent.userdata")

ENTRY_KEYS = frozenset({"path", "content", "encoding", "permissions", "owner"})
INITDATA_PATH = "initdata"  # under files.peerpod_dir
PATH_MAX = 4096  # Linux's PATH_MAX, bytes including the NUL
MAX_WARNINGS = 32  # skipped entries logged one by one; all of them are on the Plan

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

# cloud-init part types other than #cloud-config: they ask for something the agent never does.
_OTHER_PARTS = ("#!", "#include", "#cloud-boothook", "#part-handler", "#upstart-job", "#cloud-config-")


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a run will write, decided before anything is written."""

    files: tuple[FileSpec, ...]
    initdata: Initdata
    initdata_is_default: bool
    # Well-formed entries skipped as CAA skips them (files.strict = false), in document order.
    skipped_paths: tuple[str, ...] = ()
    skipped_initdata_keys: tuple[str, ...] = ()

    @property
    def skipped(self) -> int:
        return len(self.skipped_paths) + len(self.skipped_initdata_keys)


def decode(raw: bytes, cfg: Config) -> str:
    """Size-check, peel optional gzip/base64 layers, require UTF-8 text (`#cloud-config` optional)."""
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
    first = text.split("\n", 1)[0].rstrip()
    if first != "#cloud-config" and first.startswith(_OTHER_PARTS):
        reason = "user-data is a cloud-init part the agent does not run, not #cloud-config"
        raise UserDataInvalid(reason, first_line=show(first, 24))
    return text


def normalise_path(path: str | None, where: str) -> str:
    """A well-formed target path: absolute, normalised, printable, at most PATH_MAX bytes."""
    if not path:
        raise UserDataInvalid(f"{field_of(where)} has no path string", where=where)
    shown = show(path, 80)
    if len(path.encode("utf-8", "surrogatepass")) >= PATH_MAX or not path.isprintable():
        raise UserDataInvalid(f"{field_of(where)} is too long or holds control characters", where=where, path=shown)
    if not path.startswith("/"):
        raise UserDataInvalid(f"{field_of(where)} must be absolute", where=where, path=shown)
    norm = posixpath.normpath(path)
    if norm != path or "/../" in f"{path}/" or "/./" in f"{path}/" or norm.startswith("//"):
        raise UserDataInvalid(f"{field_of(where)} is not normalised", where=where, path=shown)
    return norm


def _mode(node: safeyaml.Node | None, where: str, default: int) -> int:
    mode = None if node is None else safeyaml.uint(node, where, octal_strings=True)
    if mode is None:
        return default
    if not 0 <= mode <= 0o777:  # no setuid/setgid/sticky from an untrusted host
        raise UserDataInvalid(f"{field_of(where)} out of range (0000-0777)", where=where, mode=oct(mode)[:24])
    return mode


def _content(entry: dict[str, safeyaml.Node], where: str, cfg: Config) -> bytes:
    limit = cfg.limits.max_file_bytes
    content = safeyaml.content(entry["content"], f"{where}.content") if "content" in entry else None
    encoding = safeyaml.text(entry["encoding"], f"{where}.encoding") if "encoding" in entry else None
    encoding = (encoding or "text/plain").lower()
    if encoding not in _ENCODINGS:
        raise UserDataInvalid(
            f"{field_of(where)}.encoding is not supported",
            where=f"{where}.encoding",
            encoding=show(encoding, 24),
        )
    data = (content or "").encode("utf-8") if not isinstance(content, bytes) else content
    what = f"{where}.content"
    layers = _ENCODINGS[encoding]
    try:
        for layer in layers:
            if layer == "b64":
                # The gzip under it may be up to the decoded limit; plain base64 content up to the file limit.
                bound = cfg.limits.max_decoded_bytes if "gz" in layers else limit
                data = codec.b64decode_strict(data, what=field_of(what), limit=bound)
            else:
                data = codec.gunzip_bounded(data, limit=limit, what=field_of(what))
    except UserDataInvalid as exc:
        exc.supporting_data.setdefault("where", what)
        raise
    if len(data) > limit:
        raise UserDataInvalid(
            f"{field_of(what)} is larger than the size limit", where=what, size=len(data), limit_bytes=limit
        )
    return data


@dataclass(frozen=True, slots=True)
class Parsed:
    files: list[FileSpec]
    skipped: list[str]  # well-formed paths not on the allow-list (files.strict = false)


def parse_document(text: str, cfg: Config) -> Parsed:
    """The write_files entries of a decoded #cloud-config document, fully validated."""
    return _entries(safeyaml.compose(text), cfg)


def _entries(doc: safeyaml.Node | None, cfg: Config) -> Parsed:
    if doc is None or safeyaml.is_null(doc):
        return Parsed([], [])
    if not isinstance(doc, dict):
        raise UserDataInvalid("user-data must be a YAML mapping", where="(document)")
    unknown = sorted(show(k, 24) for k in doc if k != "write_files")
    if unknown:
        raise UserDataInvalid("user-data has keys the agent refuses (only write_files)", keys=",".join(unknown)[:200])
    entries = doc.get("write_files")
    if entries is None or safeyaml.is_null(entries):
        return Parsed([], [])
    if not isinstance(entries, list):
        raise UserDataInvalid("write_files must be a list", where="write_files")
    allowed = frozenset(cfg.files.allowed_paths)
    specs: list[FileSpec] = []
    skipped: list[str] = []
    seen: set[str] = set()
    total = 0
    for i, entry in enumerate(entries):
        where = f"write_files[{i}]"
        if not isinstance(entry, dict):
            raise UserDataInvalid(f"{field_of(where)} must be a mapping", where=where)
        extra = sorted(show(k, 24) for k in entry if k not in ENTRY_KEYS)
        if extra:
            raise UserDataInvalid(f"{field_of(where)} has unsupported keys", where=where, keys=",".join(extra)[:200])
        # Every field is validated, also for an entry that is then skipped: malformed is malformed.
        given = safeyaml.text(entry["path"], f"{where}.path") if "path" in entry else None
        path = normalise_path(given, f"{where}.path")
        owner = entry.get("owner")
        if owner is not None and not safeyaml.is_null(owner):
            raise UserDataInvalid(
                "write_files[].owner is not supported: the agent cannot change owners (no CAP_CHOWN); files are root's",
                where=f"{where}.owner",
            )
        content = _content(entry, where, cfg)
        # Each entry is bounded by max_file_bytes; their sum by max_decoded_bytes, or a thousand
        # small gzip entries (skipped ones too) would each inflate to max_file_bytes.
        total += len(content)
        if total > cfg.limits.max_decoded_bytes:
            raise UserDataInvalid(
                "write_files contents are larger than the size limit in total",
                where=f"{where}.content",
                limit_bytes=cfg.limits.max_decoded_bytes,
            )
        mode = _mode(entry.get("permissions"), f"{where}.permissions", cfg.files.default_mode)
        if path not in allowed:
            if cfg.files.strict:
                raise UserDataInvalid(
                    f"{field_of(where)}.path is not on the allow-list",
                    where=f"{where}.path",
                    path=show(path, 80),
                )
            skipped.append(path)
            continue
        if path in seen:
            raise UserDataInvalid(f"{field_of(where)}.path lists a path twice", where=f"{where}.path", path=path)
        seen.add(path)
        specs.append(FileSpec(path, content, mode))
    return Parsed(specs, skipped)


def parse(text: str, cfg: Config) -> list[FileSpec]:
    """The write_files entries of a decoded #cloud-config document (skipped ones left out)."""
    return parse_document(text, cfg).files


def _warn_skipped(kind: str, name: str, reason: str) -> None:
    log.warning(
        "%s %s skipped: %s", kind, name, reason, extra=fields(stage="validate", **{kind.replace(" ", "_"): name})
    )


def plan(raw: bytes, cfg: Config) -> Plan:
    """raw user-data -> every file to write, including what initdata holds and its digest."""
    parsed = parse_document(decode(raw, cfg), cfg)
    for path in parsed.skipped[:MAX_WARNINGS]:
        _warn_skipped("path", path, "not on the allow-list (files.allowed_paths)")
    if len(parsed.skipped) > MAX_WARNINGS:
        log.warning("%d more paths skipped", len(parsed.skipped) - MAX_WARNINGS, extra=fields(stage="validate"))
    peerpod = cfg.files.peerpod_dir
    initdata_path = posixpath.join(peerpod, INITDATA_PATH)
    by_path = {s.path: s for s in parsed.files}
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
    idata = initdata.parse(toml, strict=cfg.files.strict)
    for key in idata.skipped[:MAX_WARNINGS]:
        _warn_skipped("initdata key", key, f"not one of {', '.join(initdata.ALLOWED_DATA_NAMES)}")
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
        skipped_paths=tuple(parsed.skipped),
        skipped_initdata_keys=idata.skipped,
    )

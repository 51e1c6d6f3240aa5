"""A bounded YAML composer: libyaml's event stream into plain dicts, lists and `Scalar` leaves.

PyYAML's loaders compose a node graph recursively (the C loader in Cython, so ~60 KB of nested
`[[[[` overflows the C stack and the process dies with SIGSEGV), expand aliases and merge keys
without bound (a 0.6 KB alias bomb, 0.8 KB of chained `<<: [*a, *a]`, reach hundreds of MiB),
and construct typed values from tags (impossible dates, 5000-digit ints: exceptions outside the
agent's error classes).  This module uses only the *parser* (libyaml's `yaml_parser_parse` is a
state machine with an explicit stack; PyYAML's pure-Python parser is too) and builds the tree
itself in a loop, so:

- nesting depth and node count are bounded while reading (`MAX_DEPTH`, `MAX_NODES`), before any
  further event is pulled;
- anchors, aliases and merge keys (`<<`) are refused (CAA's template never emits them, and
  yaml.v2's `UnmarshalStrict` in CAA is the only other reader of this document);
- duplicate mapping keys are refused (yaml.v2 strict mode does too), as are non-scalar keys,
  more than one document, and tags on collections other than the standard `!!map`/`!!seq`;
- scalars are *not* resolved here: a leaf keeps its text, explicit tag and whether it was plain,
  and the caller turns it into the type the field needs (`text`, `content`, `uint`), which
  is where a tag that cannot yield that type is refused.  This is schema-directed like yaml.v2
  decoding into a Go struct: a plain `123` given for a string field is the string "123".

Every failure is a `UserDataInvalid` whose supporting data names the field (`where`, e.g.
`write_files[0].encoding`) and holds at most a short `ascii()` prefix of any document text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import yaml

from guest_agent import codec
from guest_agent.errors import UserDataInvalid, field_of, show

MAX_DEPTH = 16  # CAA's document needs 3 (mapping, sequence, mapping)
MAX_NODES = 10_000  # scalars + collections; CAA's document has ~20

TAG_PREFIX = "tag:yaml.org,2002:"
STR, NULL, INT, BINARY = (TAG_PREFIX + t for t in ("str", "null", "int", "binary"))
_COLLECTION_TAGS = {"map": (None, "!", TAG_PREFIX + "map"), "seq": (None, "!", TAG_PREFIX + "seq")}

_MAX_INT_CHARS = 24  # far below Python's 4300-digit int() limit; any mode fits in 12
_OCTAL = frozenset("01234567")
# YAML 1.1's implicit types of plain scalars (null, int, ...) and its int conversion: PyYAML's own.
_RESOLVER: Any = yaml.resolver.Resolver()  # untyped in types-PyYAML
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


@dataclass(frozen=True, slots=True)
class Scalar:
    """A leaf: its text, unresolved."""

    value: str
    tag: str | None  # explicit tag (full URI, or "!"), None when untagged
    plain: bool  # plain style and untagged: YAML 1.1 implicit resolution applies
    line: int  # 1-based


Node: TypeAlias = Scalar | list["Node"] | dict[str, "Node"]


class _Frame:
    """An open collection: its container, the pending mapping key, and its path from the root."""

    __slots__ = ("container", "key", "label")

    def __init__(self, container: list[Node] | dict[str, Node], label: str) -> None:
        self.container = container
        self.key: str | None = None
        self.label = label

    def child(self) -> str:
        """The path of the node that comes next in this collection."""
        if isinstance(self.container, list):
            return f"{self.label}[{len(self.container)}]"
        return f"{self.label}.{show(self.key, 24)}" if self.key is not None else self.label


def _refuse(reason: str, stack: list[_Frame], line: int, **extra: Any) -> UserDataInvalid:
    where = (stack[-1].child() if stack else "") or "(document)"
    return UserDataInvalid(reason, where=where.lstrip("."), line=line, **extra)


# libyaml's parser when PyYAML was built with it (Debian's python3-yaml, the PyPI wheels), else
# PyYAML's own; only the parser half of the loader is used.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def compose(text: str, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Node | None:
    """The document's tree, or None for an empty stream/document. Never recurses."""
    parser: Any = None
    ev = yaml.events
    root: Node | None = None
    stack: list[_Frame] = []  # open collections, innermost last
    nodes = documents = 0
    line = 1

    def attach(node: Node) -> str:
        """Put `node` into the innermost collection; returns its path."""
        nonlocal root
        if not stack:
            root = node
            return ""
        top = stack[-1]
        where = top.child()
        if isinstance(top.container, list):
            top.container.append(node)
        elif top.key is None:  # this node is a mapping key
            if not isinstance(node, Scalar):
                raise _refuse("YAML mapping keys must be scalars", stack, line)
            if node.tag not in (None, "!", STR):
                raise _refuse("YAML mapping keys must be plain strings", stack, line, tag=show(node.tag or "", 32))
            if node.plain and node.value == "<<":
                raise _refuse("YAML merge keys (<<) are not accepted", stack, line)
            if node.value in top.container:
                raise _refuse("YAML mapping has a duplicate key", stack, line, key=show(node.value, 24))
            top.key = node.value
        else:
            top.container[top.key] = node
            top.key = None
        return where

    try:
        parser = _LOADER(text)  # the pure-Python reader checks the characters here
        while parser.check_event():
            event = parser.get_event()
            if event.start_mark is not None:
                line = event.start_mark.line + 1
            if isinstance(event, ev.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise _refuse("user-data holds more than one YAML document", stack, line)
                continue
            if isinstance(event, ev.AliasEvent):
                raise _refuse("YAML aliases (*name) are not accepted", stack, line)
            if isinstance(event, ev.NodeEvent) and event.anchor is not None:
                raise _refuse("YAML anchors (&name) are not accepted", stack, line)
            if isinstance(event, ev.ScalarEvent | ev.CollectionStartEvent):
                nodes += 1
                if nodes > max_nodes:
                    raise _refuse("user-data has too many YAML nodes", stack, line, limit=max_nodes)
            if isinstance(event, ev.ScalarEvent):
                plain = event.tag is None and bool(event.implicit[0])
                attach(Scalar(event.value, event.tag, plain, line))
            elif isinstance(event, ev.CollectionStartEvent):
                kind = "map" if isinstance(event, ev.MappingStartEvent) else "seq"
                if event.tag not in _COLLECTION_TAGS[kind]:
                    raise _refuse("YAML tag is not accepted here", stack, line, tag=show(event.tag, 32))
                if len(stack) >= max_depth:
                    raise _refuse("user-data YAML is nested too deeply", stack, line, limit=max_depth)
                container: list[Node] | dict[str, Node] = {} if kind == "map" else []
                if stack and isinstance(stack[-1].container, dict) and stack[-1].key is None:
                    raise _refuse("YAML mapping keys must be scalars", stack, line)
                stack.append(_Frame(container, attach(container)))
            elif isinstance(event, ev.CollectionEndEvent):
                stack.pop()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserDataInvalid(
            "user-data is not valid YAML",
            error=show(str(problem), 60),
            line=(mark.line + 1) if mark is not None else line,
            column=(mark.column + 1) if mark is not None else 0,
        ) from None
    finally:
        if parser is not None:
            parser.dispose()
    return root


# --- schema-directed conversion of leaves -------------------------------------------------


def _scalar(node: Node, where: str, what: str) -> Scalar:
    if not isinstance(node, Scalar):
        got = "mapping" if isinstance(node, dict) else "list"
        raise UserDataInvalid(f"{field_of(where)} must be {what}", where=where, got=got)
    return node


def _implicit_tag(value: str) -> str:
    """The tag YAML 1.1 gives a plain scalar with this text (PyYAML's resolver)."""
    tag: str = _RESOLVER.resolve(yaml.ScalarNode, value, (True, False))
    return tag


def is_null(node: Node) -> bool:
    return isinstance(node, Scalar) and (
        (node.plain and _implicit_tag(node.value) == NULL) or (node.tag == NULL and node.value in ("", "~"))
    )


def text(node: Node, where: str) -> str | None:
    """A string field: the scalar's text (None for null); only string tags are accepted."""
    if is_null(node):
        return None
    s = _scalar(node, where, "a string")
    if s.tag not in (None, "!", STR):
        raise UserDataInvalid(
            f"{field_of(where)} has a YAML tag that does not give a string", where=where, tag=show(s.tag or "")
        )
    return s.value


def content(node: Node, where: str) -> bytes | str | None:
    """A content field: a string, or bytes for `!!binary` (strict base64)."""
    if isinstance(node, Scalar) and node.tag == BINARY:
        # The same strict decoder as `encoding: b64` (whitespace dropped, then every byte checked).
        what = f"{field_of(where)} (!!binary)"
        try:
            return codec.b64decode_strict(node.value.encode("utf-8", "surrogatepass"), what=what)
        except UserDataInvalid as exc:
            exc.supporting_data.setdefault("where", where)
            raise
    return text(node, where)


def uint(node: Node, where: str, *, octal_strings: bool) -> int | None:
    """An unsigned int field: a plain or `!!int` YAML 1.1 int (0644 is octal), or, with
    `octal_strings`, a quoted octal string ("0644", "644", "0o644") as cloud-init reads it."""
    if is_null(node):
        return None
    s = _scalar(node, where, "a number")
    value = s.value.strip()
    if len(value) > _MAX_INT_CHARS:
        raise UserDataInvalid(f"{field_of(where)} is too long for a number", where=where, chars=len(value))
    if s.plain or s.tag == INT:
        # YAML 1.1's int forms (0644 is octal, 0x1F, 0b101, 1_000) except sexagesimal ("1:30"),
        # which no mode uses; "0x_" matches the form but holds no digit.
        if _implicit_tag(value) == INT and ":" not in value:
            try:
                return _CONSTRUCTOR.construct_yaml_int(yaml.ScalarNode(INT, value))
            except ValueError:
                pass
        raise UserDataInvalid(f"{field_of(where)} is not an integer", where=where, value=show(value, 24))
    digits = value.removeprefix("0o")  # (?:0o)?[0-7]{1,6}
    if octal_strings and s.tag in (None, "!", STR) and 1 <= len(digits) <= 6 and _OCTAL.issuperset(digits):
        return int(digits, 8)
    raise UserDataInvalid(
        f"{field_of(where)} must be an octal mode", where=where, value=show(value, 24), tag=show(s.tag or "")
    )

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
  and the caller turns it into the type the field needs (`text`, `content`, `uint_mode`), which
  is where a tag that cannot yield that type is refused.  This is schema-directed like yaml.v2
  decoding into a Go struct: a plain `123` given for a string field is the string "123".

Every failure is a `UserDataInvalid` whose supporting data names the field (`where`, e.g.
`write_files[0].encoding`) and holds at most a short `ascii()` prefix of any document text.
"""

from __future__ import annotations

from guest_agent import codec, record
from guest_agent.errors import UserDataInvalid

TYPE_CHECKING = False  # typing costs the boot path ~0.3 s under TCG: for mypy only
if TYPE_CHECKING:
    from typing import Any, TypeAlias

MAX_DEPTH = 16  # CAA's document needs 3 (mapping, sequence, mapping)
MAX_NODES = 10_000  # scalars + collections; CAA's document has ~20
SHOWN = 40  # characters of untrusted text an error message may carry

TAG_PREFIX = "tag:yaml.org,2002:"
STR, NULL, INT, BINARY = (TAG_PREFIX + t for t in ("str", "null", "int", "binary"))
_COLLECTION_TAGS = {"map": (None, "!", TAG_PREFIX + "map"), "seq": (None, "!", TAG_PREFIX + "seq")}

# YAML 1.1's null for a plain scalar (PyYAML's resolver): empty, ~, null, Null, NULL.
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_MAX_INT_CHARS = 24  # far below Python's 4300-digit int() limit; any mode fits in 12
_BIN, _OCT, _DEC = frozenset("01_"), frozenset("01234567_"), frozenset("0123456789_")
_OCTAL = frozenset("01234567")
_HEX = _DEC | frozenset("abcdefABCDEF")


def _is_yaml11_int(value: str) -> bool:
    """YAML 1.1's int forms (PyYAML's resolver) except sexagesimal ("1:30"), which no mode uses:
    [-+]? then 0b[01_]+, 0x[0-9a-fA-F_]+, 0[0-7_]+, 0 or [1-9][0-9_]*  (ASCII digits only)."""
    if value[:1] in ("-", "+"):
        value = value[1:]
    if value.startswith(("0b", "0x")):
        return len(value) > 2 and (_BIN if value[1] == "b" else _HEX).issuperset(value[2:])
    if value.startswith("0"):
        return _OCT.issuperset(value)
    return value[:1] in _DEC and value[0] != "_" and _DEC.issuperset(value)


def field_of(where: str) -> str:
    """`write_files[3].path` -> `write_files[].path`: reasons stay fixed, the index goes in `where`.

    Every `[digits]` (Unicode decimal digits, as a regex's \\d) becomes `[]`, left to right."""
    out: list[str] = []
    pos = 0
    while (i := where.find("[", pos)) >= 0 and (j := where.find("]", i + 1)) >= 0:
        index = where[i + 1 : j]
        if index.isdecimal():
            out.append(where[pos:i] + "[]")
            pos = j + 1
        else:
            out.append(where[pos : i + 1])
            pos = i + 1
    out.append(where[pos:])
    return "".join(out)


def show(text: str, n: int = SHOWN) -> str:
    """A short, printable-ASCII prefix of untrusted text for an error message or log field."""
    shown = ascii(text[:n])[1:-1]
    return shown + "..." if len(text) > n else shown


@record.value
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


def _events(text: str) -> Any:
    import yaml  # ~20 ms; libyaml's parser when available

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # only its parser half is used
    return yaml, yaml.parse(text, Loader=loader)


def compose(text: str, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Node | None:
    """The document's tree, or None for an empty stream/document. Never recurses."""
    yaml, events = _events(text)
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
        for event in events:
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
        events.close()
    return root


# --- the template's shape, without libyaml ------------------------------------------------
# `import yaml` costs ~90 M instructions (callgrind; ~60 % of it yaml.reader compiling one
# character-class regex), about a fifth of a whole agent run.  CAA's template
# (cloud-api-adaptor src/cloud-providers/util/cloudinit/cloudconfig.go, `cloudInitText`) only
# ever emits block mappings and sequences, one-line plain scalars and `|` literal blocks, so a
# document of exactly that shape is read here, line by line, without libyaml.  Anything else
# (a tab, a quote, a flow collection, a comment after a value, a tag, an anchor, `---`, `|-`, an
# empty value, a duplicate key, a tab or non-ASCII text outside `|` content and comments, ...)
# makes `compose_block` return None and
# `compose` decides.  The subset is chosen so that libyaml reads every document it accepts to
# the same tree, lines included (tests/test_fuzz_decoders.py checks that on generated documents).

_PLAIN_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_")
_PLAIN_REST = _PLAIN_FIRST | frozenset(".+=~-@:, ")
_KEY = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _plain(text: str) -> str | None:
    """`text` as a one-line plain scalar of the subset (trailing spaces dropped), else None."""
    value = text.rstrip(" ")
    if not value or value[0] not in _PLAIN_FIRST or not _PLAIN_REST.issuperset(value):
        return None
    if ": " in value or value.endswith(":") or "  " in value or " ," in value or value.endswith(","):
        return None  # a key, or spellings whose reading would need the full scanner
    return value


def _key(text: str) -> tuple[str, str] | None:
    """(key, rest after `: `) of a `key: rest` or `key:` line body, else None."""
    key, sep, rest = text.partition(":")
    if not sep or not key or key[0].isdigit() or not _KEY.issuperset(key):
        return None
    if rest and not rest.startswith(" "):
        return None
    return key, rest.strip(" ")


def compose_block(text: str, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Node | None:
    """The tree of a document in the template's shape (a mapping at the top), as `compose` would
    build it; None when the document is anything else.  Never recurses; one pass over the lines."""
    if not text.endswith("\n"):
        return None
    lines = text.split("\n")[:-1]
    # Tabs and non-ASCII text get through only where YAML takes them as they are (`|` content,
    # comments): keys and plain scalars below are ASCII without tab.  Python's printable
    # characters are a subset of YAML's (no C0/C1 control, CR, NEL, U+2028/2029, BOM, surrogate,
    # U+FFFE/FFFF), so libyaml's reader refuses none of what passes here.
    if not all(line.replace("\t", "").isprintable() for line in lines):
        return None
    root: dict[str, Node] = {}
    # Open collections, innermost last: (indent, container); a sequence may share its parent
    # mapping's indent (`write_files:` then `- path: ...` in column 0).
    stack: list[tuple[int, list[Node] | dict[str, Node]]] = [(0, root)]
    # `key:` (or `-`) awaiting its nested block: (parent, key or None for an item, line indent)
    pending: tuple[list[Node] | dict[str, Node], str | None, int] | None = None
    nodes = 1  # the root
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        lineno = i + 1
        i += 1
        body = line.lstrip(" ")
        if not body or body.startswith("#"):
            continue  # blank or comment line
        indent = len(line) - len(body)
        if indent == 0 and body.startswith(("---", "...", "%")):
            return None
        is_item = body == "-" or body.startswith("- ")
        if pending is not None:
            parent, pkey, pindent = pending
            pending = None
            if is_item and (indent > pindent or (indent == pindent and pkey is not None)):
                child: list[Node] | dict[str, Node] = []
            elif not is_item and indent > pindent:
                child = {}
            else:
                return None  # an empty (null) value: its marks are libyaml's to place
            if isinstance(parent, list):
                parent.append(child)
            elif pkey is not None:
                parent[pkey] = child
            stack.append((indent, child))
            nodes += 1
            if len(stack) > max_depth or nodes > max_nodes:
                return None
        while stack[-1][0] > indent:
            stack.pop()
        top_indent, top = stack[-1]
        if top_indent != indent:
            return None  # a continuation line, or an indentation libyaml would refuse
        if not is_item and isinstance(top, list):
            stack.pop()  # `key:` in the column of an indentless sequence ends it
            top_indent, top = stack[-1]
            if top_indent != indent:
                return None
        if is_item:
            if not isinstance(top, list):
                return None
            rest = body[1:].lstrip(" ")
            if not rest:
                pending = (top, None, indent)
                continue
            entry = _key(rest)
            if entry is None:
                if rest == "|":
                    value, i = _literal(lines, i, indent)
                    scalar = None if value is None else Scalar(value, None, False, lineno)
                else:
                    value = _plain(rest)
                    scalar = None if value is None else Scalar(value, None, True, lineno)
                if scalar is None:
                    return None
                top.append(scalar)
                nodes += 1
                continue
            mapping: dict[str, Node] = {}
            top.append(mapping)
            indent += len(body) - len(rest)  # the mapping's keys line up with this one
            stack.append((indent, mapping))
            nodes += 1
            if len(stack) > max_depth:
                return None
            top = mapping
        else:
            entry = _key(body)
            if entry is None or not isinstance(top, dict):
                return None
        key, rest = entry
        if key in top:
            return None
        nodes += 2  # the key and its value
        if nodes > max_nodes:
            return None
        if not rest:
            pending = (top, key, indent)
        elif rest == "|":
            block, i = _literal(lines, i, indent)
            if block is None:
                return None
            top[key] = Scalar(block, None, False, lineno)
        else:
            value = _plain(rest)
            if value is None:
                return None
            top[key] = Scalar(value, None, True, lineno)
    return root if root and pending is None else None


def _literal(lines: list[str], i: int, parent: int) -> tuple[str | None, int]:
    """A `|` block (clip chomping) starting at lines[i] inside a mapping indented `parent`:
    (its text, index of the first line after it); (None, i) outside the subset."""
    if i >= len(lines) or not lines[i].strip(" "):
        return None, i  # empty, or leading blank lines: libyaml's indentation rules decide
    first = lines[i]
    indent = len(first) - len(first.lstrip(" "))
    if indent <= parent or first[indent] == "\t":
        return None, i  # a tab while libyaml still detects the indentation is an error there
    out: list[str] = []
    while i < len(lines):
        line = lines[i]
        if not line.strip(" "):
            if len(line) > indent:
                return None, i  # spaces beyond the indentation on a blank line
            out.append("")
        elif len(line) - len(line.lstrip(" ")) >= indent:
            out.append(line[indent:])
        else:
            break
        i += 1
    while out and not out[-1]:
        out.pop()  # clip: trailing line breaks become one
    return "\n".join(out) + "\n", i


# --- schema-directed conversion of leaves -------------------------------------------------


def _scalar(node: Node, where: str, what: str) -> Scalar:
    if not isinstance(node, Scalar):
        got = "mapping" if isinstance(node, dict) else "list"
        raise UserDataInvalid(f"{field_of(where)} must be {what}", where=where, got=got)
    return node


def is_null(node: Node) -> bool:
    return isinstance(node, Scalar) and (
        (node.plain and node.value in _NULLS) or (node.tag == NULL and node.value in ("", "~"))
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
        if not _is_yaml11_int(value):
            raise UserDataInvalid(f"{field_of(where)} is not an integer", where=where, value=show(value, 24))
        digits = value.replace("_", "")
        sign = -1 if digits.startswith("-") else 1
        digits = digits.lstrip("+-")
        if digits.startswith(("0b", "0x")):
            if len(digits) == 2:  # "0x_" is all underscores
                raise UserDataInvalid(f"{field_of(where)} is not an integer", where=where, value=show(value, 24))
            return sign * int(digits[2:], 2 if digits[1] == "b" else 16)
        return sign * (int(digits, 8) if len(digits) > 1 and digits.startswith("0") else int(digits))
    digits = value.removeprefix("0o")  # (?:0o)?[0-7]{1,6}
    if octal_strings and s.tag in (None, "!", STR) and 1 <= len(digits) <= 6 and _OCTAL.issuperset(digits):
        return int(digits, 8)
    raise UserDataInvalid(
        f"{field_of(where)} must be an octal mode", where=where, value=show(value, 24), tag=show(s.tag or "")
    )

"""No import of a CPython-private module (a name starting with `_`): their names and APIs are not
promised across Python versions (3.12 renamed `_sha256`, for one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APF_STANDIN = REPO / "image" / "overlay" / "usr" / "local" / "bin" / "agent-protocol-forwarder"
SOURCES = [*sorted((REPO / "guest_agent").rglob("*.py")), APF_STANDIN]
# Calls that import a module named by a string.
IMPORT_CALLS = {"__import__", "import_module"}


def private_imports(source: str) -> list[tuple[int, str]]:
    """Every module a source imports (statements, TYPE_CHECKING blocks and function bodies too, and
    `__import__`/`import_module` of a literal name) whose top-level name starts with `_`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called in IMPORT_CALLS and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [(getattr(node, "lineno", 0), n) for n in names if n.startswith("_") and n != "__future__"]
    return sorted(found)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_module_is_imported(path: Path) -> None:
    assert private_imports(path.read_text()) == []


def test_the_scan_finds_each_form() -> None:
    source = (
        "from __future__ import annotations\nimport _socket\nimport os, _struct as s\nfrom _json import scanner\n"
        "if TYPE_CHECKING:\n    import _signal\ndef f():\n    import _sha2\n"
        "__import__('_sha256')\nimportlib.import_module('_hashlib')\nfrom . import _private_helper\n"
    )
    assert private_imports(source) == [
        (2, "_socket"), (3, "_struct"), (4, "_json"), (6, "_signal"), (8, "_sha2"), (9, "_sha256"), (10, "_hashlib")
    ]  # fmt: skip

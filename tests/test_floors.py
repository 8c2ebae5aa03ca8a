"""The floors of docs/ARCHITECTURE.md, read from the imports of every module: a package
imports only from the floors below it (and itself), so the arrows stay one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cmr_search"

#: what each package may import besides itself; the order is the floors, bottom up
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "metrics": {"core"},
    "synth": {"core"},
    "store": {"core"},
    "findings": {"core"},
    "ingest": {"core", "store"},
    "encoder": {"core", "store", "metrics", "findings"},
    "heads": {"core", "store", "metrics", "findings", "encoder"},
    "pacs": {"core", "store", "ingest", "encoder"},
    "api": {"core", "store", "ingest", "encoder", "heads", "metrics", "findings", "pacs"},
    "evals": {"core", "metrics", "synth", "store", "findings", "encoder", "heads"},
    "cli": {"core", "metrics", "synth", "store", "findings", "ingest", "encoder", "heads", "api", "evals", "pacs"},
}

#: modules over this many lines must say at their top why they are not split
MAX_LINES = 400


def modules() -> list[Path]:
    """Every Python module of the package."""
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, first-level package of cmr_search) for every import of ours in a module, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "cmr_search":  # from cmr_search import store
                names = [f"cmr_search.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import; spell the module out")
        for name in names:
            parts = name.split(".")
            if parts[0] == "cmr_search" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
        # import_module("cmr_search.x.y") strings count as imports too (the lazy package exports)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cmr_search."):
            found.append((node.lineno, node.value.split(".")[1].split(":")[0]))
    return found


def test_every_package_has_a_floor():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), "a new package needs its floor in ALLOWED and in docs/ARCHITECTURE.md"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_floors(path):
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) == 1:  # cmr_search/__init__.py
        return
    own = rel.parts[0]
    wrong = [f"{rel}:{line} imports cmr_search.{pkg}" for line, pkg in imported_packages(path)
             if pkg != own and pkg not in ALLOWED[own]]
    assert not wrong, f"{own} may import only {sorted(ALLOWED[own])}:\n" + "\n".join(wrong)


def test_the_floor_test_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from cmr_search.cli.app import app\n    return import_module('cmr_search.evals.report')\n")
    assert [pkg for _, pkg in imported_packages(bad)] == ["cli", "evals"]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_long_modules_say_why(path):
    text = path.read_text()
    lines = text.count("\n")
    if lines <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert "Longer than" in docstring, (
        f"{path.relative_to(PACKAGE)} has {lines} lines; split it or say at its top why not "
        f"(a docstring paragraph starting 'Longer than {MAX_LINES} lines because ...')")

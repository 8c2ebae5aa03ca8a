"""The store layout: the one place store paths are spelled, LATEST, and atomic publishing."""

from __future__ import annotations

import ast
from pathlib import Path

from cmr_search.core.layout import StoreLayout, publish_folder, write_atomic

PACKAGE = Path(__file__).resolve().parents[2] / "cmr_search"
#: path components that only the layout may spell (generic words such as "eval" or "heads"
#: are also metric names, so they are left to review)
LAYOUT_NAMES = {"encoders", "LATEST", "DEFAULT", "runs", "indexes", "journal", "locks", "ingest_reports", "secrets",
                "cache", "store.json", "api_keys.json", "study-writes.lock"}


def test_latest_is_none_until_set_and_then_names_the_model(tmp_path):
    layout = StoreLayout(tmp_path / "store")
    assert layout.latest_model_id() is None
    layout.set_latest("abc123")
    assert layout.latest.read_text() == "abc123\n" and layout.latest_model_id() == "abc123"
    assert layout.encoder("abc123") == tmp_path / "store" / "encoders" / "abc123"
    layout.set_latest("def456")
    assert layout.latest_model_id() == "def456"
    assert [p.name for p in layout.encoders.iterdir()] == ["LATEST"]  # no temporary file left


def test_paths_are_those_of_the_documented_store_directory(tmp_path):
    layout = StoreLayout(tmp_path)
    assert layout.index("views", "m1") == tmp_path / "indexes" / "views" / "m1"
    assert layout.table_versions("studies") == tmp_path / "lance" / "studies.lance" / "_versions"
    assert layout.study_write_lock == tmp_path / "locks" / "study-writes.lock"
    cache = layout.study_cache("1.2.3")
    assert cache.parent == tmp_path / "cache" / "studies" and "1.2.3" not in str(cache)  # no UID in a path
    assert cache == layout.study_cache("1.2.3") != layout.study_cache("1.2.4")


def test_publish_folder_moves_once_and_keeps_the_first_copy(tmp_path):
    first, second, final = tmp_path / "a", tmp_path / "b", tmp_path / "model"
    for folder, text in ((first, "one"), (second, "two")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    assert publish_folder(first, final) == final and not first.exists()
    publish_folder(second, final)  # content-addressed: an existing folder already holds these bytes
    assert (final / "weights").read_text() == "one" and not second.exists()


def test_write_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "deep" / "pointer"
    write_atomic(path, "x" * 1000)
    write_atomic(path, "y")
    assert path.read_text() == "y" and sorted(p.name for p in path.parent.iterdir()) == ["pointer"]


def test_store_paths_are_spelled_only_in_the_layout():
    spelled = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "core" / "layout.py":
            continue
        tree = ast.parse(path.read_text())
        # a command group's name ("cmr encoders") is no path
        commands = {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_typer"
                    for k in n.keywords if k.arg == "name"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES and id(node) not in commands:
                spelled.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not spelled, "use cmr_search.core.layout.StoreLayout:\n" + "\n".join(spelled)

"""No import cycle among the modules of ``cmr_search/store``, read from their imports (module
level and lazy ones, and ``import_module`` strings), like tests/test_floors.py: the tables
sit below the indexes, and withdrawal above both."""

from __future__ import annotations

import ast
from pathlib import Path

STORE = Path(__file__).resolve().parents[2] / "cmr_search" / "store"
PREFIX = "cmr_search.store"


def module_name(path: Path, root: Path = STORE, prefix: str = PREFIX) -> str:
    """Dotted name of a module file (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([prefix, *parts])


def import_graph(root: Path = STORE, prefix: str = PREFIX) -> dict[str, set[str]]:
    """module -> the modules of ``prefix`` it imports (``from pkg import name`` names the
    submodule when there is one, else the package)."""
    files = {module_name(p, root, prefix): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{path}:{node.lineno}: relative import; spell the module out"
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                           for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(prefix + "."):
                targets = [node.value.split(":")[0]]
            for target in targets:
                while target not in files and "." in target:  # `import a.b.c` of a name inside a module
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_store():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_withdrawal_sits_above_the_tables_and_the_indexes():
    graph = import_graph()
    assert not graph[f"{PREFIX}.embedding_store"] & {f"{PREFIX}.withdrawal", f"{PREFIX}.index"} \
        and not any(m.startswith(f"{PREFIX}.index.") for m in graph[f"{PREFIX}.embedding_store"])
    below = {m for m in graph if m.startswith(f"{PREFIX}.index")} | {f"{PREFIX}.embedding_store", f"{PREFIX}.clip_store"}
    assert not [m for m in below if f"{PREFIX}.withdrawal" in graph[m]]
    assert {f"{PREFIX}.embedding_store", f"{PREFIX}.index.vector_index"} <= graph[f"{PREFIX}.withdrawal"]


def test_the_cycle_test_sees_a_lazy_cycle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from cmr_search.store.pkg.b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from cmr_search.store.pkg import a\n    return a\n")
    (tmp_path / "c.py").write_text("def g():\n    return import_module('cmr_search.store.pkg.a')\n")
    graph = import_graph(tmp_path, PREFIX)
    assert graph[f"{PREFIX}.c"] == {f"{PREFIX}.pkg.a"}
    assert find_cycle(graph) == [f"{PREFIX}.pkg.a", f"{PREFIX}.pkg.b", f"{PREFIX}.pkg.a"]

"""The tree shows the architecture: no import cycles in vlmtune/, no module over 400 lines, and what reads a run's
outputs (merge, inference) never imports the code that trains."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlmtune"
MAX_LINES = 400


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions alike.

    `from pkg import name` counts as importing pkg.name when that is a module, else pkg. A package importing its
    own submodules (registration, re-export) is not an edge: importing a submodule runs its package's __init__
    anyway, so such edges would make every package a cycle."""
    files = {module_name(root, f): f for f in sorted(root.rglob("*.py"))}
    graph = {}
    for me, path in files.items():
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in targets:
                while name and name not in files:  # `import vlmtune.x.y` of a name inside a module
                    name = name.rpartition(".")[0]
                if name and name != me and not name.startswith(me + "."):
                    found.add(name)
        graph[me] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle, as the path a -> b -> ... -> a through one strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_within(graph, group) for group in groups]


def _path_within(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module (breadth first, staying inside the group)."""
    start = min(group)
    came = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                path = [v]
                while came[path[-1]] is not None:
                    path.append(came[path[-1]])
                return [*reversed(path), start]
            if w not in came:
                came[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle inside {sorted(group)}")


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_vlmtune_has_no_import_cycle():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text(encoding="utf-8").splitlines())
             for p in PACKAGE.rglob("*.py")}
    over = {name: n for name, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by job): {over}"


def test_what_reads_a_run_never_imports_training():
    """merge and predict read vlmtune.json through run_metadata; they once imported `training` for its file name."""
    graph = import_graph(PACKAGE)
    readers = [m for m in graph if m.split(".")[:2] in (["vlmtune", "merge"], ["vlmtune", "inference"])]
    assert "vlmtune.merge" in readers and "vlmtune.inference.load" in readers
    bad = {m: sorted(reaches(graph, m) & {"vlmtune.training", "vlmtune.checkpoints"}) for m in readers}
    assert not {m: b for m, b in bad.items() if b}


CASES = {  # modules written into a tiny package -> (some of its import edges, its cycles)
    "the cycle vlmtune once had, two of its imports inside functions": (
        {"merge": "def merge_adapter():\n    from .merge_check import parity_check\n",
         "merge_check": "def parity_check():\n    from . import prediction\n",
         "prediction": "from . import merge\nfrom .sub.folder import x\n"},
        # a package importing its own submodules (pkg, pkg.sub) is no edge
        {"pkg.prediction": {"pkg.merge", "pkg.sub.folder"}, "pkg": set(), "pkg.sub": set()},
        [["pkg.merge", "pkg.merge_check", "pkg.prediction", "pkg.merge"]]),
    "relative imports up, plain imports": (
        {"merge": "import pkg.sub.folder\n", "sub.deep": "from .. import merge\nfrom ..sub import folder\n",
         "sub.folder": "def f():\n    import pkg.sub.deep as d\n"},
        {"pkg.sub.deep": {"pkg.merge", "pkg.sub.folder"}, "pkg.merge": {"pkg.sub.folder"}},
        [["pkg.merge", "pkg.sub.folder", "pkg.sub.deep", "pkg.merge"]]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_walker_finds_the_cycles_of_a_tiny_package(tmp_path, case):
    files, edges, expected = CASES[case]
    base = {"__init__": "from .merge import merge_adapter\n", "errors": "", "sub.__init__": "from . import folder\n",
            "sub.folder": "from ..errors import E\n"}
    for name, text in {**base, **files}.items():
        path = tmp_path.joinpath("pkg", *name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert {m: graph[m] for m in edges} == edges
    assert cycles(graph) == expected

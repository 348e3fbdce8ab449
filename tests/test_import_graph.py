"""The ``sdft`` package's modules import each other without cycles.

Every ``import`` / ``from ... import`` statement counts: at module level, inside functions and
under ``if TYPE_CHECKING:`` (a type-only import is still a dependency, and dependencies point one
way). ``from package import name`` depends on the submodule ``package.name`` when there is one,
otherwise on ``package/__init__.py``; importing ``a.b.c`` depends on ``a.b.c`` only (the parent
packages' ``__init__`` modules run first, but that is how packages work, not a cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

import sdft


def module_files(package_dir: Path, package: str) -> dict[str, Path | None]:
    """Dotted module name -> source file, for every ``.py`` file under ``package_dir``; compiled
    extensions (``_kernel.abi3.so``) and stub-only modules map to None (they import nothing
    from the package)."""
    modules: dict[str, Path | None] = {}
    for path in sorted(package_dir.rglob("*")):
        name, _, suffix = path.name.partition(".")
        if suffix not in ("py", "pyi") and not suffix.endswith(("so", "pyd")):
            continue
        parts = [*path.relative_to(package_dir).parent.parts, name]
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join([package, *parts])
        if suffix == "py":
            modules[module] = path
        else:
            modules.setdefault(module, None)
    return modules


def imported_names(module: str, path: Path) -> Iterable[tuple[str, str | None]]:
    """``(module, name)`` for every import in the file (``name`` of ``from module import name``;
    None for ``import module``), relative imports resolved against ``module``."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # level 1 is the package holding this module (the module itself for __init__)
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                if keep <= 0:
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top")
                base = ".".join(parts[:keep])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                yield source, alias.name


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    files = module_files(package_dir, package)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for module, path in files.items():
        if path is None:
            continue
        for source, name in imported_names(module, path):
            if name is not None and f"{source}.{name}" in files:
                target = f"{source}.{name}"
            elif source in files:
                target = source
            else:
                continue  # outside the package
            if target != module:
                graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(start: str) -> None:
        # Tarjan's algorithm, iterative (no recursion limit on deep graphs).
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, set(c)) for c in components if len(c) > 1]


def _cycle_in(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A shortest cycle through the alphabetically first member of a strongly connected set."""
    start = min(members)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


PACKAGE_DIR = Path(sdft.__file__).parent


def test_the_sdft_package_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(PACKAGE_DIR, "sdft"))
    print(describe(cycles))
    assert not cycles, f"import cycles in sdft:\n{describe(cycles)}"


def test_the_local_backend_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE_DIR, "sdft")
    local = "sdft.backends.local"
    cycles = [c for c in find_cycles(graph) if any(m.startswith(local) for m in c)]
    assert not cycles, f"import cycles through {local}:\n{describe(cycles)}"
    # Dependencies point one way: the service builds training clients, not the reverse.
    assert f"{local}._service" not in graph[f"{local}._training"]


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_relative_function_level_and_type_only_imports_are_followed(tmp_path: Path) -> None:
    package_dir = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import thing\n",
            "pkg/a.py": "def thing():\n    from pkg.sub import b\n    return b\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import c\n",
            "pkg/c.py": "import os\nfrom .sub.b import x\nfrom . import a, _ext\n",
            "pkg/_ext.abi3.so": "",
            "pkg/_ext.pyi": "from pkg import c\n",
        },
    )
    graph = import_graph(package_dir, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.c"},
        "pkg.c": {"pkg.sub.b", "pkg.a", "pkg._ext"},
        "pkg._ext": set(),
    }
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert describe(cycles) == "pkg.a -> pkg.sub.b -> pkg.c -> pkg.a"


def test_an_acyclic_graph_has_no_cycles_and_a_self_loop_is_ignored(tmp_path: Path) -> None:
    package_dir = _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import low\n",
            "pkg/low.py": "import pkg.low\n",
            "pkg/high.py": "from pkg.low import x\nfrom pkg import low\n",
        },
    )
    graph = import_graph(package_dir, "pkg")
    assert graph == {"pkg": {"pkg.low"}, "pkg.low": set(), "pkg.high": {"pkg.low"}}
    assert find_cycles(graph) == []


def test_a_relative_import_beyond_the_top_is_reported(tmp_path: Path) -> None:
    package_dir = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from ... import x\n"})
    with pytest.raises(ValueError, match=r"a\.py:1: relative import beyond the top"):
        import_graph(package_dir, "pkg")

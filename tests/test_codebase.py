"""The shape the code keeps: no import cycles, no reaching into another module's private names,
modules a reader can hold. Read from the source (ast), so a violation names its file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "attnexplain"
SHIPPED_PLUGINS = sorted(path for path in (REPO / "plugins").glob("*/attnexplain_*") if path.is_dir())

#: A module a reader can hold in one sitting (STYLE.md); past it, a module holds several concepts.
MAX_MODULE_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import the module may execute, at its top or inside a function; not those under
    ``if TYPE_CHECKING:``, which never run."""
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return [
        node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in type_only
    ]


def _imported_module(current: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[current].name == "__init__.py"
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _package_module(name: str) -> str | None:
    """The package module that importing ``name`` executes last (itself, or the module holding it)."""
    while name and name not in MODULES:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name or None


def _dependencies(current: str) -> set[str]:
    """The package modules ``current`` imports at run time. Importing ``a.b.c`` also runs ``a.b``'s
    ``__init__``, so that is a dependency too, except for ``current``'s own parent packages (Python
    runs those before ``current`` itself)."""
    tree = ast.parse(MODULES[current].read_text(encoding="utf-8"))
    targets: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            module = _imported_module(current, node)
            names = [f"{module}.{alias.name}" for alias in node.names] + [module]
        for name in names:
            found = _package_module(name)
            while found:
                targets.add(found)
                found = _package_module(found.rsplit(".", 1)[0]) if "." in found else None
    own_parents = {".".join(current.split(".")[:depth]) for depth in range(1, current.count(".") + 1)}
    return targets - own_parents - {current}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules
    that import each other, directly or through the others."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for dependency in graph[module]:
            if dependency not in index:
                visit(dependency)
                lowest[module] = min(lowest[module], lowest[dependency])
            elif dependency in on_stack:
                lowest[module] = min(lowest[module], index[dependency])
        if lowest[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_cycle_at_run_time():
    graph = {module: _dependencies(module) for module in MODULES}
    cycles = _cycles(graph)
    described = ["; ".join(f"{module} -> {sorted(graph[module] & set(cycle))}" for module in cycle) for cycle in cycles]
    assert not cycles, "\n".join(described)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n")
    assert [alias.name for node in _runtime_imports(tree) for alias in node.names] == ["TYPE_CHECKING", "y"]


def _python_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    for plugin in SHIPPED_PLUGINS:
        files += sorted(plugin.rglob("*.py"))
    return files


@pytest.mark.parametrize("path", _python_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_no_private_name_is_imported_from_another_module(path):
    """A name with a leading underscore is its module's own business; a second module that needs it
    means the name has a public home to move to (STYLE.md: one home per concept)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    reaching_in = [
        f"{path.relative_to(REPO)}:{node.lineno}: {alias.name}"
        for node in _runtime_imports(tree) + _type_only_imports(tree)
        if isinstance(node, ast.ImportFrom) and _is_ours(node)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not reaching_in, reaching_in


def _type_only_imports(tree: ast.Module) -> list[ast.ImportFrom]:
    runtime = {id(node) for node in _runtime_imports(tree)}
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and id(node) not in runtime]


def _is_ours(node: ast.ImportFrom) -> bool:
    return bool(node.level) or (node.module or "").split(".")[0].startswith("attnexplain")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(REPO)))
def test_every_module_is_one_a_reader_can_hold(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines"

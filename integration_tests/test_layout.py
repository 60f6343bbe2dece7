"""The architecture rules the folders promise, checked on the sources (no imports run).

* no module imports another module's private (underscore) names;
* no import circles within or across packages (imports at any level of a module, except those
  under ``if TYPE_CHECKING:``, which never run);
* the training loop (``torchspec.trainer.loop``) reaches the target only through
  ``targets.contract`` and the one factory, never an engine, a dump or a command;
* the trainer's composition file stays a composition (under 300 lines).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "packages").glob("*/src"))


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path, src): path for src in SOURCES for path in sorted(src.rglob("*.py"))}


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement of the module that can run (not under ``if TYPE_CHECKING``)."""
    found: list[ast.ImportFrom | ast.Import] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _imported_modules(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports (a package import counts as its ``__init__``)."""
    targets: set[str] = set()
    for node in _imports(path):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".strip(".")
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for candidate in candidates:
            if candidate in MODULES and candidate != name:
                targets.add(candidate)
                break
    return targets


GRAPH = {name: _imported_modules(name, path) for name, path in MODULES.items()}


def test_the_rules_see_every_package():
    assert {"torchspec.draft_models", "torchspec.data", "torchspec.trainer", "torchspec.converter"} <= set(MODULES)
    assert GRAPH["torchspec.trainer.loop.trainer"], "the import graph is empty: the scanner is broken"


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name, path in MODULES.items():
        for node in _imports(path):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchspec"):
                # A package may import its own private submodules; nothing may import another's private names.
                private = [
                    a.name
                    for a in node.names
                    if a.name.startswith("_")
                    and not a.name.startswith("__")
                    and not (node.module == name and f"{name}.{a.name}" in MODULES)
                ]
                if private:
                    offenders.append(f"{name} imports {', '.join(private)} from {node.module}")
    assert not offenders, "\n".join(offenders)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in GRAPH[node]:
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            connect(node)
    return components


def test_no_import_circles():
    assert _cycles() == []


def test_a_planted_circle_is_found(monkeypatch):
    monkeypatch.setitem(GRAPH, "torchspec.draft_models.errors", {"torchspec.draft_models.config"})
    assert any("torchspec.draft_models.errors" in cycle for cycle in _cycles())


def _reachable_from(package: str, through: set[str]) -> dict[str, str]:
    """Modules outside ``package`` that its modules import directly, except those in ``through``."""
    reached = {}
    for name, targets in GRAPH.items():
        if name.startswith(package + ".") or name == package:
            for target in targets:
                if not target.startswith(package) and target not in through:
                    reached[target] = name
    return reached


@pytest.mark.parametrize(
    "forbidden",
    [
        "torchspec.trainer.engine",
        "torchspec.trainer.commands",
        "torchspec.trainer.targets.engine",
        "torchspec.trainer.targets.dump",
    ],
)
def test_the_loop_does_not_import_engines_dumps_or_commands(forbidden):
    reached = _reachable_from("torchspec.trainer.loop", through=set())
    offenders = {target: source for target, source in reached.items() if target.startswith(forbidden)}
    assert not offenders, offenders


def test_the_trainer_file_only_composes():
    lines = MODULES["torchspec.trainer.loop.trainer"].read_text().count("\n")
    assert lines < 300, f"loop/trainer.py has {lines} lines: move what is not composition into a component"

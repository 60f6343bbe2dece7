"""Fail when a package's sources or tests import a distribution the package does not declare.

Run in a package's `unit.*` environment (`hatch run unit:test` does, before pytest):

    python .ci/declared_imports.py trainer

Those environments reuse the interpreter's torch (system-packages), so whatever else the
interpreter has installed is importable there too and pytest alone would not notice a test that
imports it. This reads every import statement of `packages/<name>/src` and `tests` (those inside
functions and `try` blocks too) and checks that each installed distribution they come from is one
the package declares, directly or through its dependencies (its `test` extra included). Imports of
modules that are not installed here (optional ones such as vllm or tensorboard, test helpers) are
left to the tests.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_closure(distribution: str, extras: tuple[str, ...] = ("test",)) -> set[str]:
    """The distribution and everything its requirements pull in, as installed here."""
    closure: set[str] = set()
    pending = [(distribution, extras)]
    while pending:
        name, wanted = pending.pop()
        if _normalize(name) in closure:
            continue
        closure.add(_normalize(name))
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # an optional requirement that is not installed
        for line in requirements:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *wanted)):
                pending.append((requirement.name, tuple(requirement.extras)))
    return closure


def imported_modules(folders: list[Path]) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for file in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(file.relative_to(ROOT)))
    return found


def main(package: str) -> int:
    folder = ROOT / "packages" / package
    distribution = f"torchspec-{package}"
    closure = declared_closure(distribution)
    providers = metadata.packages_distributions()
    undeclared = []
    for module, files in sorted(imported_modules([folder / "src", folder / "tests"]).items()):
        if module in sys.stdlib_module_names or module not in providers:
            continue
        distributions = {_normalize(d) for d in providers[module]}
        if not distributions & closure:
            undeclared.append(f"  {module} ({', '.join(sorted(distributions))}): {', '.join(sorted(files))}")
    if undeclared:
        print(f"{distribution} imports distributions it does not declare (add them to its pyproject):")
        print("\n".join(undeclared))
        return 1
    print(f"{distribution}: every imported distribution is declared")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

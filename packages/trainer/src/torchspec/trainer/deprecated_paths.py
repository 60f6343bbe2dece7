"""Module paths of torchspec-trainer < 0.7, which had 26 modules side by side: importing one still
works, with a DeprecationWarning naming where its contents live now. Attributes are looked up in
the new modules on first use, so importing an old path loads nothing it is not asked for."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["forwarding_getattr", "install", "moved_names_getattr"]

_PACKAGE = "torchspec.trainer"
_MOVED = {
    "checkpoint": ("loop.checkpoint",),
    "states": ("loop.states",),
    "data_loader": ("loop.data_loader",),
    "training_data": ("loop.training_data",),
    "lr_schedule": ("loop.lr_schedule",),
    "optimizer": ("loop.optimizer",),
    "metrics": ("loop.metrics",),
    "run_lock": ("loop.run_lock",),
    "draft": ("loop.draft",),
    "trainer": ("loop.run", "loop.trainer", "loop.resume"),
    "parallelize": ("distributed.parallelize",),
    "host_memory": ("distributed.host_memory",),
    "target": ("targets.contract", "targets.head", "targets.in_process"),
    "engine_target": ("targets.engine", "engine.launch", "loop.prefetch"),
    "state_dump": ("targets.dump", "commands.dump_states"),
    "engine_worker": ("engine.worker",),
    "engine_connector": ("engine.connector",),
    "evaluate": ("commands.evaluate",),
    "verify": ("commands.verify",),
    "regenerate": ("commands.regenerate",),
    "default_assets": ("commands.default_assets",),
}


class _MovedModule(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name)
        self._targets = tuple(f"{_PACKAGE}.{target}" for target in targets)

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no {attribute!r}")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = _MOVED[spec.name.rsplit(".", 1)[1]]
        warnings.warn(
            f"{spec.name} moved to {', '.join(f'{_PACKAGE}.{t}' for t in targets)} in torchspec-trainer 0.7.0; "
            "import from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return _MovedModule(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package == _PACKAGE and name in _MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader())
        return None


def forwarding_getattr(package: str, module: str):
    """A module ``__getattr__`` for ``package``, a module before 0.7.0 and a folder since: its old
    names come from ``package.module``, with a DeprecationWarning."""

    def __getattr__(name: str) -> Any:
        target = importlib.import_module(f"{package}.{module}")
        if name.startswith("__") or not hasattr(target, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        warnings.warn(
            f"{package}.{name} moved to {target.__name__}.{name} in torchspec-trainer 0.7.0",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(target, name)

    return __getattr__


def moved_names_getattr(module: str, target: str, names: tuple[str, ...], version: str):
    """A module ``__getattr__`` for ``module``, whose ``names`` moved to module ``target`` in ``version``:
    they still resolve, with a DeprecationWarning naming the new place."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} moved to {target}.{name} in torchspec-trainer {version}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(target), name)

    return __getattr__


def install() -> None:
    """Make the old module paths importable (once per process)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())

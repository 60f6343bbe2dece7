"""The module paths of torchspec-trainer < 0.7 still import, each with one DeprecationWarning
naming where its contents live now (deprecated_paths)."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize(
    ("old", "name", "new_module"),
    [
        ("torchspec.trainer.target", "TargetModel", "torchspec.trainer.targets.in_process"),
        ("torchspec.trainer.target", "TargetOutput", "torchspec.trainer.targets.contract"),
        ("torchspec.trainer.engine_target", "PrefetchingLoader", "torchspec.trainer.loop.prefetch"),
        ("torchspec.trainer.state_dump", "dump_states", "torchspec.trainer.commands.dump_states"),
        ("torchspec.trainer.trainer", "train", "torchspec.trainer.loop.run"),
        ("torchspec.trainer.checkpoint", "Checkpointer", "torchspec.trainer.loop.checkpoint"),
    ],
)
def test_an_old_module_path_imports_with_a_warning_naming_the_new_one(old, name, new_module):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to .*{new_module}.* in torchspec-trainer 0.7.0"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new_module), name)
    with pytest.raises(AttributeError, match="moved to"):
        module.no_such_name  # noqa: B018


def test_the_old_engine_and_distributed_modules_forward_their_names():
    from torchspec.trainer.distributed import process_group
    from torchspec.trainer.engine import launch

    with pytest.warns(DeprecationWarning, match="torchspec.trainer.engine.run_vllm moved to .*engine.launch"):
        from torchspec.trainer.engine import run_vllm
    assert run_vllm is launch.run_vllm
    with pytest.warns(DeprecationWarning, match="distributed.barrier moved to .*process_group"):
        from torchspec.trainer.distributed import barrier
    assert barrier is process_group.barrier


@pytest.mark.parametrize(
    ("module", "name", "new_module"),
    [
        ("torchspec.trainer.targets.factory", "resolve_target_path", "torchspec.trainer.targets.resolve"),
        ("torchspec.trainer.targets.factory", "load_tokenizer", "torchspec.trainer.targets.resolve"),
        ("torchspec.trainer.engine.fleet", "VllmServer", "torchspec.trainer.engine.servers"),
    ],
)
def test_names_moved_in_0_10_still_import_with_a_warning(module, name, new_module):
    with pytest.warns(
        DeprecationWarning, match=rf"{module}.{name} moved to {new_module}.{name} in torchspec-trainer 0.10.0"
    ):
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(new_module), name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        importlib.import_module(module).no_such_name  # noqa: B018

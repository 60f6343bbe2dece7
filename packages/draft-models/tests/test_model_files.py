"""The model files hold the math only: parallelism and memory policy are applied from outside (the trainer)."""

import ast
from pathlib import Path

import torchspec.draft_models

MODEL_FILES = [
    "auto.py",
    "config.py",
    "deepseek.py",
    "draft_model.py",
    "eagle3.py",
    "layers.py",
    "llama.py",
    "loss.py",
    "rope.py",
    "speculative.py",
    "ttt_attention.py",
]


def _imports(file: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return imported


def test_the_model_files_import_nothing_of_torch_distributed_or_activation_checkpointing():
    package = Path(torchspec.draft_models.__file__).parent
    assert set(MODEL_FILES) <= {file.name for file in package.glob("*.py")}
    for name in MODEL_FILES:
        bad = {n for n in _imports(package / name) if n.startswith(("torch.distributed", "torch.utils.checkpoint"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_the_check_sees_every_spelling_of_such_an_import(tmp_path):
    for line in (
        "import torch.distributed as dist",
        "from torch import distributed",
        "from torch.distributed import fsdp",
    ):
        (tmp_path / "m.py").write_text(line + "\n")
        assert "torch.distributed" in _imports(tmp_path / "m.py"), line

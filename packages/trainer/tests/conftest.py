import sys
from pathlib import Path

# Shared builders live in trainer_test_helpers (a unique name: pytest runs in importlib mode across
# all packages, where same-named helper modules would collide).
sys.path.insert(0, str(Path(__file__).parent))
# The crafted-checkpoint recipes (crafted_checkpoints.py) are shared with draft-models' tests, and
# kept there rather than in any package's sources: they hold a code-running pickle payload.
sys.path.insert(1, str(Path(__file__).resolve().parents[2] / "draft-models" / "tests"))

import pytest


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A briefly trained tiny target and a short conversation file (built once per session)."""
    from trainer_test_helpers import build_small_assets

    return build_small_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(autouse=True)
def _run_in_a_temporary_directory(tmp_path, monkeypatch):
    """Every test runs in its own working directory: the CLI records its last run in ./outputs
    (and the default output_dir is relative), which must never land in the repository."""
    monkeypatch.chdir(tmp_path)

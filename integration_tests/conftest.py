import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_helpers import STEPS, train_default  # noqa: E402


@pytest.fixture(scope="session")
def default_target():
    from torchspec.trainer.default_assets import ensure_default_target

    return ensure_default_target()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """``trained_run(arch, *overrides)``: the output folder of a default run, trained once per
    session for each distinct (arch, overrides), shared by the end-to-end and engine tests."""
    runs = {}

    def get(arch: str, *overrides: str, steps: int = STEPS) -> Path:
        key = (arch, steps, overrides)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"run-{arch}")
            train_default(arch, root / "run", steps, *overrides)
            runs[key] = root / "run"
        return runs[key]

    return get

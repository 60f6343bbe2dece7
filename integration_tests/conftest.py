import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_helpers import STEPS, train_default  # noqa: E402


@pytest.fixture(scope="session")
def default_target():
    from torchspec.trainer.commands.default_assets import ensure_default_target

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


@pytest.fixture(scope="session")
def mla_target():
    """The built-in tiny DeepSeek-V3-style target (``builtin:tiny-deepseek-v3``): MLA attention with
    DeepSeek-V3's layout scaled down, layers 0-2 dense and 3-7 MoE routed as DeepSeek-V3 routes,
    RMSNorm weights spread around 1, trained briefly on the bundled conversations; the default MLA
    run (configs/default_mla.yaml) trains against it."""
    from torchspec.trainer.commands.default_assets import ensure_builtin_target

    return ensure_builtin_target("builtin:tiny-deepseek-v3")

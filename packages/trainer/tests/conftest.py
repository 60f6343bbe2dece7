import sys
from pathlib import Path

# Shared builders live in trainer_test_helpers (a unique name: pytest runs in importlib mode across
# all packages, where same-named helper modules would collide).
sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A briefly trained tiny target and a short conversation file (built once per session)."""
    from trainer_test_helpers import build_small_assets

    return build_small_assets(tmp_path_factory.mktemp("assets"))

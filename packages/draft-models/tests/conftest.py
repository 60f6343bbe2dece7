import sys
from pathlib import Path

import pytest

# Tests import their shared builders from draft_helpers (a unique name: pytest runs in importlib mode
# across all packages, where same-named helper modules would collide).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(params=["llama", "mla"])
def draft_kind(request):
    return request.param

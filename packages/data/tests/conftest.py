import sys
from pathlib import Path

import pytest

# Shared builders live in data_test_helpers (a unique name: pytest runs in importlib mode across all
# packages, where same-named helper modules would collide).
sys.path.insert(0, str(Path(__file__).parent))

from torchspec.data import build_local_tokenizer, list_templates  # noqa: E402

from data_test_helpers import load_tokenizer_with_template  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """One tokenizer holding the special tokens of every registered template (chat_template: the first)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    build_local_tokenizer(directory, template=list_templates())
    return directory


@pytest.fixture
def tokenizer_for(tokenizer_dir):
    """Fresh copy of the shared tokenizer whose chat_template is the Jinja export of the named template."""
    return lambda name: load_tokenizer_with_template(tokenizer_dir, name)

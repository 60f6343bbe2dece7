"""Every training config shipped in configs/ loads strictly and names a loadable draft config."""

from pathlib import Path

import pytest

from torchspec.draft_models import AutoDraftModelConfig
from torchspec.trainer.config import load_config
from torchspec.trainer.loop.draft import eagle3_1_options

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_training_config_loads(name, monkeypatch):
    monkeypatch.chdir(REPO)  # draft_config paths are relative to the repository root
    config = load_config(REPO / "configs" / name)
    if config.model.draft_config is not None:
        draft = AutoDraftModelConfig.from_file(config.model.draft_config)
        assert draft.draft_vocab_size <= draft.vocab_size
        assert config.model.draft_vocab_size in (None, draft.draft_vocab_size)
        # the EAGLE-3.1 variants train fc_norm + norm_output, which vLLM serves for both architectures
        values = {**draft.to_dict(), **eagle3_1_options(config.model)}
        served = AutoDraftModelConfig.from_dict(values)
        assert (served.fc_norm, served.norm_output) == (("eagle3.1" in name),) * 2
        assert served.engine_refusals() == []

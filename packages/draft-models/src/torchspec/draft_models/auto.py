"""``AutoEagle3DraftModel``: build or load the draft named by a config's ``architectures``."""

from __future__ import annotations

import os

import torch

import torchspec.draft_models.deepseek  # noqa: F401  (registers the MLA draft)
import torchspec.draft_models.llama  # noqa: F401  (registers the Llama draft)
from torchspec.draft_models.config import AutoDraftModelConfig, Eagle3DraftConfig
from torchspec.draft_models.draft_model import Eagle3DraftModel, model_class_for

__all__ = ["AutoEagle3DraftModel"]


class AutoEagle3DraftModel:
    @staticmethod
    def from_config(config: Eagle3DraftConfig | dict) -> Eagle3DraftModel:
        if isinstance(config, dict):
            config = AutoDraftModelConfig.from_dict(config)
        return model_class_for(config)(config)

    @staticmethod
    def from_pretrained(
        directory: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> Eagle3DraftModel:
        return Eagle3DraftModel.from_pretrained(directory, dtype=dtype, device=device)

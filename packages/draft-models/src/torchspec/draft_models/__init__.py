"""EAGLE-3 draft models (Llama-style and DeepSeek MLA) with test-time training."""

from torchspec.draft_models.__about__ import __version__
from torchspec.draft_models.auto import AutoEagle3DraftModel
from torchspec.draft_models.aux_layers import default_aux_layer_ids
from torchspec.draft_models.checkpoint_layout import CheckpointNotFoundError, TrainingCheckpoint, resolve_checkpoint
from torchspec.draft_models.config import (
    AutoDraftModelConfig,
    DeepseekEagle3Config,
    DraftConfigError,
    Eagle3DraftConfig,
    LlamaEagle3Config,
)
from torchspec.draft_models.deepseek import Eagle3DeepseekV2ForCausalLM
from torchspec.draft_models.draft_model import DraftCheckpointError, Eagle3DraftModel
from torchspec.draft_models.eagle3 import Eagle3Model, Eagle3Output, step0_loss_mask
from torchspec.draft_models.llama import LlamaForCausalLMEagle3
from torchspec.draft_models.safe_checkpoint import (
    DamagedCheckpointError,
    UnsafeCheckpointError,
    load_dcp,
    load_torch,
    open_safetensors,
    read_dcp_metadata,
)
from torchspec.draft_models.speculative import SpeculativeGenerator, SpeculativeResult, target_greedy_generate

__all__ = [
    "AutoDraftModelConfig",
    "AutoEagle3DraftModel",
    "CheckpointNotFoundError",
    "DamagedCheckpointError",
    "DeepseekEagle3Config",
    "DraftCheckpointError",
    "DraftConfigError",
    "Eagle3DeepseekV2ForCausalLM",
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "Eagle3Model",
    "Eagle3Output",
    "LlamaEagle3Config",
    "LlamaForCausalLMEagle3",
    "SpeculativeGenerator",
    "SpeculativeResult",
    "TrainingCheckpoint",
    "UnsafeCheckpointError",
    "__version__",
    "default_aux_layer_ids",
    "load_dcp",
    "load_torch",
    "open_safetensors",
    "read_dcp_metadata",
    "resolve_checkpoint",
    "step0_loss_mask",
    "target_greedy_generate",
]

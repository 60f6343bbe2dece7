"""Online EAGLE-3 draft training against a live target model with FSDP2."""

from torchspec.trainer.__about__ import __version__
from torchspec.trainer.checkpoint import Checkpointer, find_latest
from torchspec.trainer.config import ConfigError, TrainConfig, dump_config, load_config
from torchspec.trainer.data_loader import DistributedBatchLoader, EvalBatches, MicroBatch
from torchspec.trainer.default_assets import ensure_default_target
from torchspec.trainer.lr_schedule import WarmupDecaySchedule
from torchspec.trainer.metrics import TTTCounts, acceptance_length, summarize, ttt_counts
from torchspec.trainer.states import TrainState
from torchspec.trainer.target import TargetModel, TargetOutput
from torchspec.trainer.trainer import Trainer, TrainResult, train

__all__ = [
    "Checkpointer",
    "ConfigError",
    "DistributedBatchLoader",
    "EvalBatches",
    "MicroBatch",
    "TTTCounts",
    "TargetModel",
    "TargetOutput",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "WarmupDecaySchedule",
    "__version__",
    "acceptance_length",
    "dump_config",
    "ensure_default_target",
    "find_latest",
    "load_config",
    "summarize",
    "train",
    "ttt_counts",
]

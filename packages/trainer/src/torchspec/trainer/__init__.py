"""Online EAGLE-3 draft training against a live target model with FSDP2."""

from torchspec.trainer import deprecated_paths
from torchspec.trainer.__about__ import __version__
from torchspec.trainer.commands.default_assets import ensure_default_target
from torchspec.trainer.config import ConfigError, TrainConfig, dump_config, load_config
from torchspec.trainer.loop.checkpoint import Checkpointer, find_latest
from torchspec.trainer.loop.data_loader import DistributedBatchLoader, EvalBatches, MicroBatch
from torchspec.trainer.loop.lr_schedule import WarmupDecaySchedule
from torchspec.trainer.loop.metrics import TTTCounts, acceptance_length, summarize, ttt_counts
from torchspec.trainer.loop.run import train
from torchspec.trainer.loop.states import TrainState
from torchspec.trainer.loop.trainer import Trainer, TrainResult
from torchspec.trainer.targets.contract import TargetOutput
from torchspec.trainer.targets.in_process import TargetModel

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

deprecated_paths.install()  # the module paths of torchspec-trainer < 0.7 still import, with a DeprecationWarning

"""The training configuration: the schema users read (``schema``), reading files and overrides
(``loading``), checks across keys (``validation``) and keys that moved between versions (``migration``)."""

from torchspec.trainer.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_yaml_scalar,
)
from torchspec.trainer.config.migration import LAYOUT_VERSION, MOVED_KEYS, upgrade_saved_config
from torchspec.trainer.config.schema import (
    BUILTIN_SAMPLE_CONVERSATIONS,
    BUILTIN_TINY_TARGET,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LRScheduleConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    TargetConfig,
    TrainConfig,
    TrainingConfig,
    TTTConfig,
)
from torchspec.trainer.config.validation import judge_configured, real_acceptance_off, validate_config

__all__ = [
    "BUILTIN_SAMPLE_CONVERSATIONS",
    "BUILTIN_TINY_TARGET",
    "LAYOUT_VERSION",
    "MOVED_KEYS",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LRScheduleConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimizerConfig",
    "TTTConfig",
    "TargetConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "judge_configured",
    "load_config",
    "parse_yaml_scalar",
    "real_acceptance_off",
    "upgrade_saved_config",
    "validate_config",
]

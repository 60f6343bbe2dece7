"""Training configuration: typed sections, YAML files, dotted command-line overrides.

A config is sections of plain dataclasses, each named for what it configures: ``model``, ``target``
(where the target's hidden states come from), ``data``, ``training`` (the run: output, seed,
devices, batches, length), ``optimizer``, ``lr_schedule``, ``ttt``, ``checkpoint`` and ``metrics``.
Files and overrides are checked strictly: an unknown key fails with the closest known key as a
suggestion, a value of the wrong type fails with its key path, and a key of the 0.3 layout
(``training.learning_rate``) fails naming where it moved
(``MOVED_KEYS``). The defaults are the embedded demo run (a tiny built-in target and the bundled
sample conversations), so ``TrainConfig()`` trains something.

YAML is read with one change to PyYAML's scalar rules: ``5e-5`` is a float (YAML 1.1 wants
``5.0e-5``), because learning rates are written that way on command lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError

__all__ = [
    "BUILTIN_SAMPLE_CONVERSATIONS",
    "BUILTIN_TINY_TARGET",
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
    "load_config",
    "parse_yaml_scalar",
    "upgrade_saved_config",
]

BUILTIN_TINY_TARGET = "builtin:tiny-qwen3"
BUILTIN_SAMPLE_CONVERSATIONS = "builtin:sample-conversations"


class ConfigError(UserInputError):
    """A configuration mistake the user can fix; the message is one line naming the key and the fix."""


@dataclass
class ModelConfig:
    # A local Hugging Face causal-LM folder, or the built-in tiny Qwen3-style target.
    target_model_path: str = BUILTIN_TINY_TARGET
    # A draft config.json (e.g. configs/draft_models/*.json); null generates one from the target.
    draft_config: str | None = None
    # Architecture of a generated draft (draft_config: null).
    draft_architecture: Literal["llama", "mla"] = "llama"
    # Below the target vocabulary: the draft predicts only the most frequent supervised tokens.
    draft_vocab_size: int | None = None
    # Target layers whose inputs feed the draft (low, mid, high), 3 distinct ids in ascending order (the
    # engines concatenate the states in layer order); null = [2, L//2, L-3] (see default_aux_layer_ids).
    aux_layer_ids: list[int] | None = None
    trust_remote_code: bool = False
    # Target weights; auto = bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Tokenizer folder; null = the target folder.
    tokenizer_path: str | None = None
    # EAGLE-3.1: `true` turns on fc_norm and norm_output, the variant vLLM serves for both architectures.
    eagle3_1: bool = False
    # The single EAGLE-3.1 options; null = as the draft config says (off in a generated one).
    # fc_norm: an RMSNorm per aux hidden state before fc; norm_before_fc: one over their concatenation
    # (Llama drafts only: vLLM's DeepSeek draft lacks it); norm_output: chain the normed hidden state.
    fc_norm: bool | None = None
    norm_before_fc: bool | None = None
    norm_output: bool | None = None


@dataclass
class TargetConfig:
    """Where the target's hidden states come from; ``model.target_model_path`` names the target."""

    # transformers: the target in the trainer's processes | vllm: a vLLM engine in its own process,
    # online | dump: the files `trainer:dump-states` wrote (no target decoder runs at all)
    backend: Literal["transformers", "vllm", "dump"] = "transformers"
    # vllm: extra vllm.LLM arguments (tensor_parallel_size, gpu_memory_utilization, ...)
    engine_args: dict[str, Any] = field(default_factory=dict)
    engine_devices: str | None = None  # vllm: CUDA_VISIBLE_DEVICES of the engine, e.g. "4,5,6,7"
    # vllm: the python of the environment vLLM is installed in (null: $TORCHSPEC_ENGINE_PYTHON, else this one)
    engine_python: str | None = None
    prefetch_batches: int = 2  # vllm: global batches the engine works ahead of the draft
    engine_timeout_s: float = 900.0  # vllm: longest wait for the engine to start or answer
    dump_dir: str | None = None  # dump (and dump-states' output): the hidden-state dump folder


@dataclass
class DataConfig:
    train_path: str = BUILTIN_SAMPLE_CONVERSATIONS
    eval_path: str | None = None
    # Share of the training conversations held out for evaluation when eval_path is null.
    eval_split: float = 0.1
    # A torchspec-data template name, or "hf" for the tokenizer's own chat template.
    chat_template: str = "qwen"
    prompt_key: str = "conversations"
    max_seq_length: int = 2048
    num_proc: int = 1
    cache_dir: str | None = None


@dataclass
class TrainingConfig:
    """The run: where it writes, its seed, devices, batch geometry and length."""

    output_dir: str = "outputs/default_llama"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Draft compute dtype; auto = bfloat16 on GPU (fp32 master weights and reductions), float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    micro_batch_size: int = 4
    # Samples per optimizer step, across all ranks and accumulation steps.
    global_batch_size: int = 16
    num_epochs: int = 4
    # Overrides num_epochs when set.
    max_steps: int | None = None
    # Gradient-norm clipping before each optimizer step.
    max_grad_norm: float = 1.0
    # Shard the frozen target with FSDP2 too, for targets larger than one device.
    shard_target: bool = False


@dataclass
class OptimizerConfig:
    """AdamW (fp32 master weights)."""

    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class LRScheduleConfig:
    """The learning-rate multiplier per step: linear warmup, then ``kind``."""

    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    # Two spellings of the warmup length: the file or command line that sets one resets the other
    # (so warmup_steps alone replaces the default ratio); one place setting both is an error.
    warmup_steps: int | None = None
    warmup_ratio: float | None = 0.05
    # WSD: share of the total steps spent decaying at the end.
    decay_ratio: float = 0.1
    # The schedule decays to min_lr_ratio * optimizer.learning_rate.
    min_lr_ratio: float = 0.1


@dataclass
class TTTConfig:
    """Test-time training of the draft: the unroll, the loss weights and its memory."""

    # Draft steps unrolled per position.
    length: int = 7
    # Step k's loss is weighted loss_decay**k.
    loss_decay: float = 0.8
    attention_backend: Literal["sdpa", "flex_attention"] = "sdpa"
    # false: the draft's MLP is recomputed in backward; true: its whole decoder layer (parallelize.py).
    gradient_checkpointing: bool = False


@dataclass
class CheckpointConfig:
    """When checkpoints are saved and kept, and what a run starts from."""

    # Steps between checkpoints (0 = only at the end); the default run saves every 20 of its 108 steps.
    save_interval: int = 20
    # Checkpoints kept (the best one is always kept); null = all.
    keep_last: int | None = 3
    # "auto" (continue from the latest complete checkpoint in output_dir, if any), null (a fresh run;
    # refuses an output_dir holding checkpoints) or a checkpoint folder.
    resume: str | None = "auto"
    # A checkpoint whose draft weights start a new run (optimizer, schedule and data start fresh).
    continual_training: str | None = None


@dataclass
class MetricsConfig:
    """What the run measures and reports, and how often."""

    log_interval: int = 10
    # Steps between evaluations on the held-out set (0 = only at the end).
    eval_interval: int = 40
    # After training, real speculative decoding of this many held-out prompts (0 = off).
    speculative_eval_prompts: int = 8
    tensorboard: bool = False
    progress_bar: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# Keys that left the `training` section in torchspec-trainer 0.4.0: old path -> new path. An old key
# in a file or on the command line is an error naming the new one; configs saved in checkpoints of
# older runs are read through `upgrade_saved_config`.
LAYOUT_VERSION = "0.4.0"
MOVED_KEYS = {
    "training.learning_rate": "optimizer.learning_rate",
    "training.weight_decay": "optimizer.weight_decay",
    "training.betas": "optimizer.betas",
    "training.lr_schedule": "lr_schedule.kind",
    "training.warmup_steps": "lr_schedule.warmup_steps",
    "training.warmup_ratio": "lr_schedule.warmup_ratio",
    "training.decay_ratio": "lr_schedule.decay_ratio",
    "training.min_lr_ratio": "lr_schedule.min_lr_ratio",
    "training.ttt_length": "ttt.length",
    "training.loss_decay": "ttt.loss_decay",
    "training.attention_backend": "ttt.attention_backend",
    "training.gradient_checkpointing": "ttt.gradient_checkpointing",
    "training.save_interval": "checkpoint.save_interval",
    "training.keep_last": "checkpoint.keep_last",
    "training.resume": "checkpoint.resume",
    "training.continual_training": "checkpoint.continual_training",
    "training.log_interval": "metrics.log_interval",
    "training.eval_interval": "metrics.eval_interval",
    "training.speculative_eval_prompts": "metrics.speculative_eval_prompts",
    "training.tensorboard": "metrics.tensorboard",
    "training.progress_bar": "metrics.progress_bar",
}


def upgrade_saved_config(values: dict) -> dict:
    """A config as an older version saved it (``training_config.yaml`` in a checkpoint or output
    folder), in this version's layout; a config already in it comes back equal."""
    upgraded = {section: dict(keys or {}) for section, keys in values.items()}
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        if old_key in upgraded.get(old_section, {}):
            new_section, new_key = new.split(".")
            upgraded.setdefault(new_section, {})[new_key] = upgraded[old_section].pop(old_key)
    return upgraded


# --- YAML with scientific-notation floats ------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, regexp)
        for tag, regexp in _Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"
    ]
    _Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, [_first])


def parse_yaml_scalar(text: str) -> Any:
    """A command-line value read with the same rules as the config files (``5e-5`` is a float)."""
    if text == "":
        return ""
    return yaml.load(text, Loader=_Loader)


# --- dict <-> dataclasses, strictly ------------------------------------------------------------------

_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# Keys that say the same thing two ways. Each layer of a config (the defaults, the file, the
# command line) may set one of a pair; it then resets the other, so a later layer's choice replaces
# an earlier one's instead of conflicting with it. Both set in one layer is a ConfigError.
_ALTERNATIVES = (("lr_schedule", "warmup_steps", "warmup_ratio"),)
_UNION_ORIGINS = (Union, types.UnionType)
_NOT_A_MATCH = object()


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in _SECTIONS}


def _all_key_paths() -> list[str]:
    paths: list[str] = []
    for section, cls in _section_classes().items():
        paths.extend(f"{section}.{f.name}" for f in dataclasses.fields(cls))
    return paths


def _suggest(path: str) -> str:
    candidates = _all_key_paths() + list(_SECTIONS)
    match = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not match:
        # The right key in the wrong place: "learning_rate" at the top level, or under data.
        by_leaf = {candidate.rsplit(".", 1)[-1]: candidate for candidate in candidates}
        leaf = difflib.get_close_matches(path.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[leaf[0]]] if leaf else []
    return f"; did you mean {match[0]}?" if match else f"; known sections: {', '.join(_SECTIONS)}"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(hint))
    if origin in _UNION_ORIGINS:
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` or ``_NOT_A_MATCH``. Integers are accepted for floats; nothing else converts."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        return value if any(value == v and type(value) is type(v) for v in typing.get_args(hint)) else _NOT_A_MATCH
    if origin in _UNION_ORIGINS:
        for arg in typing.get_args(hint):
            if arg is type(None):
                if value is None:
                    return None
                continue
            result = _coerce(value, arg)
            if result is not _NOT_A_MATCH:
                return result
        return _NOT_A_MATCH
    if origin is dict:
        return dict(value) if isinstance(value, dict) and all(isinstance(k, str) for k in value) else _NOT_A_MATCH
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NOT_A_MATCH
        (item_hint,) = typing.get_args(hint)
        items = [_coerce(v, item_hint) for v in value]
        return _NOT_A_MATCH if any(i is _NOT_A_MATCH for i in items) else items
    if hint is bool:
        return value if isinstance(value, bool) else _NOT_A_MATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT_A_MATCH
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _NOT_A_MATCH
    if hint is str:
        return value if isinstance(value, str) else _NOT_A_MATCH
    return value if isinstance(value, hint) else _NOT_A_MATCH


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def config_from_dict(values: dict, source: str | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Build a config from nested dicts on top of ``base`` (default: the defaults). ``source`` names
    the file for error messages."""
    config = dataclasses.replace(base) if base is not None else TrainConfig()
    if values is None:
        return config
    if not isinstance(values, dict):
        raise ConfigError(
            f"{source or 'config'}: expected a mapping of sections ({', '.join(_SECTIONS)}), "
            f"got {type(values).__name__}"
        )
    sections = _section_classes()
    layer = set()
    for section, section_values in values.items():
        if section not in sections:
            raise ConfigError(f"unknown key {section}{_where(source)}{_suggest(str(section))}")
        if section_values is None:
            continue
        if not isinstance(section_values, dict):
            raise ConfigError(f"{section}{_where(source)} must be a mapping of keys, got {section_values!r}")
        current = dataclasses.replace(getattr(config, section))
        for key, value in section_values.items():
            _set_field(current, section, str(key), value, source)
            layer.add((section, str(key)))
        setattr(config, section, current)
    _settle_alternatives(config, layer, source)
    return config


def _settle_alternatives(config: TrainConfig, layer: set[tuple[str, str]], source: str | None) -> None:
    """Apply the ``_ALTERNATIVES`` rule to the keys one layer set (``(section, key)`` pairs)."""
    for section, first, second in _ALTERNATIVES:
        values = getattr(config, section)
        chosen = [key for key in (first, second) if (section, key) in layer and getattr(values, key) is not None]
        if len(chosen) == 2:
            raise ConfigError(
                f"{section}.{first} and {section}.{second} are both set{_where(source)}; keep one of them"
            )
        if chosen:
            setattr(values, second if chosen[0] == first else first, None)


def _set_field(section_obj: Any, section: str, key: str, value: Any, source: str | None) -> None:
    path = f"{section}.{key}"
    hints = typing.get_type_hints(type(section_obj))
    if path in MOVED_KEYS:
        raise ConfigError(f"{path}{_where(source)} moved to {MOVED_KEYS[path]} in torchspec-trainer {LAYOUT_VERSION}")
    if key not in hints:
        raise ConfigError(f"unknown key {path}{_where(source)}{_suggest(path)}")
    coerced = _coerce(value, hints[key])
    if coerced is _NOT_A_MATCH:
        raise ConfigError(f"{path}{_where(source)} must be {_type_name(hints[key])}, got {value!r}")
    setattr(section_obj, key, coerced)


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings (values read as YAML scalars)."""
    config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name)) for name in _SECTIONS})
    layer = set()
    for override in overrides:
        where = f"command-line override {override!r}"
        if "=" not in override:
            raise ConfigError(f"{where} is not key=value; write it like optimizer.learning_rate=5e-5")
        path, text = override.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(f"unknown key {path.strip()} in {where}{_suggest(path.strip())}")
        try:
            value = parse_yaml_scalar(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
        _set_field(getattr(config, parts[0]), parts[0], parts[1], value, where)
        layer.add((parts[0], parts[1]))
    _settle_alternatives(config, layer, "the command-line overrides")
    return config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The defaults, updated by the YAML file at ``path`` (if any), then by ``overrides``; validated."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            values = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
        config = config_from_dict(values, source=str(path))
    config = apply_overrides(config, overrides or [])
    validate_config(config, source=str(path) if path is not None else None)
    return config


def validate_config(config: TrainConfig, source: str | None = None) -> None:
    """Checks between values that types alone cannot express."""
    where = _where(source)
    t, d, m = config.training, config.data, config.model
    opt, sched, ttt, ckpt, met = config.optimizer, config.lr_schedule, config.ttt, config.checkpoint, config.metrics

    def positive(section: str, name: str, value: Any, allow_zero: bool = False) -> None:
        # `not value >= 0` also catches NaN, which every comparison calls False (it would reach AdamW).
        if value is not None and (not value >= 0 or value == float("inf") or (value == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{section}.{name}{where} must be a finite number {bound}, got {value}")

    for name in ("micro_batch_size", "global_batch_size", "num_epochs", "max_steps", "max_grad_norm"):
        positive("training", name, getattr(t, name))
    positive("optimizer", "learning_rate", opt.learning_rate)
    positive("optimizer", "weight_decay", opt.weight_decay, allow_zero=True)
    positive("lr_schedule", "warmup_steps", sched.warmup_steps, allow_zero=True)
    positive("ttt", "length", ttt.length)
    positive("checkpoint", "keep_last", ckpt.keep_last)
    positive("checkpoint", "save_interval", ckpt.save_interval, allow_zero=True)
    positive("metrics", "log_interval", met.log_interval)
    for name in ("eval_interval", "speculative_eval_prompts"):
        positive("metrics", name, getattr(met, name), allow_zero=True)
    positive("data", "max_seq_length", d.max_seq_length)
    positive("target", "prefetch_batches", config.target.prefetch_batches, allow_zero=True)
    positive("target", "engine_timeout_s", config.target.engine_timeout_s)
    if config.target.backend == "dump" and config.target.dump_dir is None:
        raise ConfigError(
            f"target.backend is dump but target.dump_dir is not set{where}; set it to the folder "
            "`hatch run trainer:dump-states` wrote"
        )
    positive("data", "num_proc", d.num_proc)
    positive("model", "draft_vocab_size", m.draft_vocab_size)
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"training.global_batch_size ({t.global_batch_size}){where} must be a multiple of "
            f"training.micro_batch_size ({t.micro_batch_size})"
        )
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"optimizer.betas{where} must be two numbers in [0, 1), got {opt.betas}")
    for section, name in (
        ("lr_schedule", "warmup_ratio"),
        ("lr_schedule", "decay_ratio"),
        ("lr_schedule", "min_lr_ratio"),
        ("ttt", "loss_decay"),
    ):
        value = getattr(getattr(config, section), name)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"{section}.{name}{where} must be in [0, 1], got {value}")
    if sched.warmup_steps is not None and sched.warmup_ratio is not None:
        raise ConfigError(
            f"lr_schedule.warmup_steps and lr_schedule.warmup_ratio are both set{where}; set one and the other to null"
        )
    if not 0 <= d.eval_split < 1:
        raise ConfigError(f"data.eval_split{where} must be in [0, 1), got {d.eval_split}")
    if m.aux_layer_ids is not None:  # the count and order here, the range once the target is read
        try:
            validate_aux_layer_ids(m.aux_layer_ids, None, source=f"model.aux_layer_ids{where}")
        except UserInputError as err:
            raise ConfigError(str(err)) from None
    # resume: auto goes with continual_training (the default is auto): the first launch starts from
    # continual_training's weights, a relaunch resumes its own checkpoints. An explicit resume path does not.
    if ckpt.resume not in (None, "auto") and ckpt.continual_training is not None:
        raise ConfigError(
            f"checkpoint.resume and checkpoint.continual_training are both set{where}; resume continues a run, "
            "continual_training starts a new one from its weights: keep one"
        )


# --- output -----------------------------------------------------------------------------------------


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: TrainConfig, path: str | os.PathLike | None = None) -> str:
    """The fully resolved config as YAML (written to ``path`` when given); loading it gives ``config`` back."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text

"""One place builds the configured target: in this process (transformers), on a vLLM engine, or from
a dump (``target.backend``), with the tokenizer and dtype every command resolves the same way.
The engine and dump modules are imported only when chosen."""

from __future__ import annotations

from pathlib import Path

import torch

from torchspec.draft_models.config import DTYPES
from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.distributed.process_group import DistributedContext
from torchspec.trainer.targets.contract import ServedTarget
from torchspec.trainer.targets.in_process import TargetModel

__all__ = ["backend_name", "build_target", "load_tokenizer", "resolve_dtype", "resolve_target_path"]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def backend_name(config: TrainConfig) -> str:
    backend = config.target.backend
    if backend == "vllm":
        return "a vLLM engine (target.backend=vllm)"
    if backend == "dump":
        return f"the dump {config.target.dump_dir}"
    if backend == "fleet":
        return f"{len(config.target.servers)} states servers (target.backend=fleet)"
    return "transformers in this process"


def build_target(config: TrainConfig, path: Path, ctx: DistributedContext) -> TargetModel | ServedTarget:
    """The target as ``target.backend`` says: in this process, on a vLLM engine, on a fleet of states
    servers, or a dump on disk."""
    m, t, backend = config.model, config.training, config.target
    dtype = resolve_dtype(m.dtype, ctx.device)
    if backend.backend == "transformers":
        device = "cpu" if t.shard_target else ctx.device
        return TargetModel.from_pretrained(path, m.aux_layer_ids, dtype, device, m.trust_remote_code)
    if t.shard_target:
        raise ConfigError(
            f"training.shard_target applies to target.backend=transformers, not {backend.backend}; an engine shards "
            "its target itself (target.engine_args: {tensor_parallel_size: N})"
        )
    if backend.backend == "dump":
        from torchspec.trainer.targets.dump import DumpTarget

        assert backend.dump_dir is not None  # validate_config
        return DumpTarget.open(backend.dump_dir, path, m.aux_layer_ids, dtype, ctx.device, m.trust_remote_code)
    if backend.backend == "fleet":
        from torchspec.trainer.targets.fleet import FleetTarget

        return FleetTarget.connect(
            path,
            m.aux_layer_ids,
            dtype,
            ctx.device,
            servers=list(backend.servers),
            timeout_s=backend.engine_timeout_s,
            request_timeout_s=backend.request_timeout_s,
            trust_remote_code=m.trust_remote_code,
        )
    if ctx.world_size > 1:
        raise ConfigError(
            f"target.backend=vllm trains on one process (this run has {ctx.world_size}); for several ranks serve the "
            "target with `vllm serve` (target.backend=fleet, `trainer serve-command`) or dump the states first "
            "(`hatch run trainer:dump-states`, target.backend=dump)"
        )
    from torchspec.trainer.engine.launch import engine_options
    from torchspec.trainer.targets.engine import EngineTarget

    return EngineTarget.start(
        path,
        m.aux_layer_ids,
        dtype,
        ctx.device,
        max_seq_length=config.data.max_seq_length,
        log_path=Path(t.output_dir) / "engine.log" if ctx.is_main else None,
        **engine_options(config),
    )


def resolve_target_path(path: str) -> Path:
    """``model.target_model_path`` as a folder: a built-in target's (built once, then cached), or ``path``."""
    if path.startswith("builtin:"):
        from torchspec.trainer.commands.default_assets import BUILTIN_TARGETS, ensure_builtin_target

        if path not in BUILTIN_TARGETS:
            raise ConfigError(
                f"model.target_model_path {path} is not a built-in target; use one of {', '.join(BUILTIN_TARGETS)} "
                "or a local Hugging Face folder"
            )
        return ensure_builtin_target(path)
    return Path(path)


def load_tokenizer(path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"tokenizer folder {path} does not exist; set model.tokenizer_path or model.target_model_path"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"no usable tokenizer in {path} ({str(err).splitlines()[0]}); set model.tokenizer_path"
        ) from err

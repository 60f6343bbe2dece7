"""One place builds the configured target: in this process (transformers), on a vLLM engine, or from
a dump (``target.backend``), with the tokenizer and dtype every command resolves the same way.
The engine and dump modules are imported only when chosen."""

from __future__ import annotations

from pathlib import Path

from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.deprecated_paths import moved_names_getattr
from torchspec.trainer.distributed.process_group import DistributedContext
from torchspec.trainer.targets.contract import ServedTarget
from torchspec.trainer.targets.in_process import TargetModel
from torchspec.trainer.targets.resolve import resolve_dtype

__all__ = ["backend_name", "build_target"]


def backend_name(config: TrainConfig) -> str:
    backend = config.target.backend
    if backend == "vllm":
        return "a vLLM engine (target.backend=vllm)"
    if backend == "dump":
        return f"the dump {config.target.dump_dir}"
    if backend == "fleet":
        t = config.target
        if t.start_servers:
            return f"{t.start_servers} states servers per node started by the trainer (target.start_servers)"
        return f"{len(t.servers)} states servers (target.backend=fleet)"
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

        servers, supervisor = list(backend.servers), None
        if backend.start_servers:
            from torchspec.trainer.targets.fleet_servers import start_node_servers

            servers, supervisor = start_node_servers(config, ctx.local_rank)
        try:
            return FleetTarget.connect(
                path,
                m.aux_layer_ids,
                dtype,
                ctx.device,
                servers=servers,
                timeout_s=backend.engine_timeout_s,
                request_timeout_s=backend.request_timeout_s,
                trust_remote_code=m.trust_remote_code,
                supervisor=supervisor,
                transport=backend.transport,
                mooncake=backend.mooncake,
            )
        except BaseException:
            if supervisor is not None:
                supervisor.close()
            raise
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
        max_restarts=backend.max_engine_restarts,
        log_path=Path(t.output_dir) / "engine.log" if ctx.is_main else None,
        **engine_options(config),
    )


# Names that lived here before torchspec-trainer 0.10.0.
__getattr__ = moved_names_getattr(
    __name__, "torchspec.trainer.targets.resolve", ("load_tokenizer", "resolve_dtype", "resolve_target_path"), "0.10.0"
)

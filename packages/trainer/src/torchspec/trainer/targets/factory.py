"""One place builds the configured target: in this process (transformers), on a vLLM engine, or from
a dump (``target.backend``), with the tokenizer and dtype every command resolves the same way; and
the vLLM judge of the target with the draft (``metrics.judge_url``, ``metrics.start_judge``). The
engine and dump modules are imported only when chosen."""

from __future__ import annotations

from pathlib import Path

from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.deprecated_paths import moved_names_getattr
from torchspec.trainer.distributed.process_group import DistributedContext
from torchspec.trainer.targets.contract import ServedTarget
from torchspec.trainer.targets.in_process import TargetModel
from torchspec.trainer.targets.resolve import resolve_dtype

__all__ = ["backend_name", "build_judge", "build_target"]


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


def build_judge(config: TrainConfig, initial_draft: Path, max_model_len: int, num_draft_tokens: int):
    """The configured judge (an ``engine.judge.JudgeServer``): the target with ``initial_draft``
    (any draft of the trained draft's shapes) at ``metrics.judge_url``, or started by this process at
    ``127.0.0.1:metrics.judge_port`` on ``metrics.judge_devices``, with ``target.engine_args``."""
    import sys

    import torch

    from torchspec.trainer.engine.draft_reload import judge_serve_command
    from torchspec.trainer.engine.judge import JudgeServer
    from torchspec.trainer.engine.launch import engine_python, vllm_available
    from torchspec.trainer.targets.resolve import resolve_target_path

    met, t = config.metrics, config.target
    python = engine_python(t.engine_python)
    if met.start_judge and python == sys.executable and not vllm_available():  # say so before step 1
        raise ConfigError(
            f"metrics.start_judge: vLLM is not installed in this environment ({sys.executable}); set "
            "target.engine_python to the python of one that has it (the repository's: .venvs/engine/bin/python, "
            "made by `hatch env create test`)"
        )
    url = (met.judge_url or f"http://127.0.0.1:{met.judge_port}").rstrip("/")
    on_cpu = not torch.cuda.is_available()
    dtype = resolve_dtype(config.model.dtype, torch.device("cpu" if on_cpu else "cuda"))
    command = judge_serve_command(
        resolve_target_path(config.model.target_model_path),
        initial_draft,
        num_draft_tokens=num_draft_tokens,
        engine_args=t.engine_args,
        port=int(url.rsplit(":", 1)[-1]),
        host="127.0.0.1" if met.start_judge else "0.0.0.0",
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=max_model_len,
        on_cpu=on_cpu,
        python=python,
    )
    log = Path(config.training.output_dir) / "judge" / "server.log"
    return JudgeServer(
        command,
        url,
        log,
        start=met.start_judge,
        devices=met.judge_devices,
        start_timeout_s=t.engine_timeout_s,
        request_timeout_s=t.request_timeout_s,
    )

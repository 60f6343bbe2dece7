"""``trainer serve-command``: the exact command that starts one states server of a config's fleet.

Run it on every engine node (one server per node or per group of GPUs, each with the parallelism
its size needs in ``target.engine_args``), then train with ``target.backend=fleet
target.servers=[...]``: the trainer refuses a server started another way before step 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from torchspec.draft_models import default_aux_layer_ids
from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.engine.fleet import format_command, serve_command
from torchspec.trainer.targets.engine import vllm_layer_ids
from torchspec.trainer.targets.factory import resolve_dtype, resolve_target_path

__all__ = ["print_serve_command", "serve_command_for"]


def serve_command_for(config: TrainConfig, port: int = 8000, host: str = "0.0.0.0") -> list[str]:
    """The states-server command of ``config`` (its target, aux layers, dtype, length, engine args)."""
    import json

    m, t = config.model, config.target
    if t.states_dir is None:
        raise ConfigError(
            "target.states_dir is not set; name the folder the servers write states to (on several nodes, a "
            "shared file system every trainer rank reads)"
        )
    target = resolve_target_path(m.target_model_path)
    try:
        num_layers = int(json.loads((target / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model.target_model_path {target}: no readable config.json with num_hidden_layers ({err})")
    aux = list(m.aux_layer_ids) if m.aux_layer_ids is not None else default_aux_layer_ids(num_layers)
    on_cpu = not torch.cuda.is_available()
    dtype = resolve_dtype(m.dtype, torch.device("cpu" if on_cpu else "cuda"))
    return serve_command(
        target,
        vllm_layer_ids(aux, num_layers),
        Path(t.states_dir),
        port=port,
        host=host,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=config.data.max_seq_length + 2,  # the prompt and the one token generated
        engine_args=t.engine_args,
        on_cpu=on_cpu,
        python=t.engine_python,
    )


def print_serve_command(config: TrainConfig, port: int = 8000, host: str = "0.0.0.0") -> None:
    print(format_command(serve_command_for(config, port, host)))

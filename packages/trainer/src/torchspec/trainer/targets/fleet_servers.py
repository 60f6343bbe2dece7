"""The states servers of a config's fleet: the command that starts one (:func:`serve_command_for`,
which ``trainer serve-command`` prints), and, with ``target.start_servers=N``, the servers the
trainer starts itself (:func:`start_node_servers`): local rank 0 of each node starts N servers of
that command on the node (``target.server_devices``), the node's ranks use them, and a server that
exits is started again (``engine.servers.ServerSupervisor``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from torchspec.draft_models import default_aux_layer_ids
from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.engine.fleet import serve_command
from torchspec.trainer.engine.servers import ServerSupervisor, wait_until_serving
from torchspec.trainer.targets.engine import vllm_layer_ids
from torchspec.trainer.targets.resolve import resolve_dtype, resolve_target_path

__all__ = ["serve_command_for", "start_node_servers"]


def serve_command_for(
    config: TrainConfig, port: int = 8000, host: str = "0.0.0.0", states_dir: str | Path | None = None
) -> list[str]:
    """The states-server command of ``config`` (its target, aux layers, dtype, length, engine args);
    ``states_dir`` replaces ``target.states_dir``."""
    import json

    m, t = config.model, config.target
    states_dir = states_dir or t.states_dir
    if states_dir is None and t.transport == "file":
        raise ConfigError(
            "target.states_dir is not set; name the folder the servers write states to (on several nodes, a "
            "shared file system every trainer rank reads), or use target.transport=mooncake"
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
        None if states_dir is None else Path(states_dir),
        transport=t.transport,
        mooncake=t.mooncake,
        port=port,
        host=host,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=config.data.max_seq_length + 2,  # the prompt and the one token generated
        engine_args=t.engine_args,
        on_cpu=on_cpu,
        python=t.engine_python,
    )


def start_node_servers(config: TrainConfig, local_rank: int) -> tuple[list[str], ServerSupervisor | None]:
    """The URLs of this node's ``target.start_servers`` states servers, and on local rank 0 the
    supervisor that started them (the other ranks wait until they answer). Their logs and
    ``servers.json`` are in ``<output_dir>/servers/<host name>/``; states go to ``target.states_dir``,
    else ``<output_dir>/servers/<host name>/states``."""
    import socket

    t = config.target
    urls = [f"http://127.0.0.1:{t.server_port + i}" for i in range(t.start_servers)]
    if local_rank != 0:
        wait_until_serving(urls, t.engine_timeout_s)
        return urls, None
    folder = Path(config.training.output_dir) / "servers" / socket.gethostname()
    states_dir = None
    if t.transport == "file":
        states_dir = Path(t.states_dir) if t.states_dir else folder / "states"
        states_dir.mkdir(parents=True, exist_ok=True)
    commands = [
        serve_command_for(config, port=t.server_port + i, host="127.0.0.1", states_dir=states_dir)
        for i in range(t.start_servers)
    ]
    supervisor = ServerSupervisor(
        commands,
        urls,
        folder,
        devices=list(t.server_devices) or None,
        start_timeout_s=t.engine_timeout_s,
        max_restarts=t.max_engine_restarts,
    )
    return urls, supervisor

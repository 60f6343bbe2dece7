"""``trainer serve-command``: the exact command that starts one states server of a config's fleet.

Run it on every engine node (one server per node or per group of GPUs, each with the parallelism
its size needs in ``target.engine_args``), then train with ``target.backend=fleet
target.servers=[...]``: the trainer refuses a server started another way before step 1. Or let the
trainer start them (``target.start_servers``: ``targets.fleet_servers``).
"""

from __future__ import annotations

from torchspec.trainer.config import TrainConfig
from torchspec.trainer.engine.fleet import format_command
from torchspec.trainer.targets.fleet_servers import serve_command_for

__all__ = ["print_serve_command"]


def print_serve_command(config: TrainConfig, port: int = 8000, host: str = "0.0.0.0") -> None:
    print(format_command(serve_command_for(config, port, host)))

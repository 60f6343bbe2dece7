"""Command line: ``python -m torchspec.trainer.cli train [--config FILE] [section.key=value ...]``,
``... dump-states [--config FILE] [overrides]`` (``torchspec.trainer.commands.dump_states``) and
``python -m torchspec.trainer.cli evaluate|verify|bench|regenerate ...`` (``torchspec.trainer.commands.evaluate``,
``verify``, ``bench``, ``regenerate``).

With no ``--config`` the embedded default runs (a tiny built-in target, the bundled sample
conversations, a small Llama-style draft); ``configs/default_llama.yaml`` spells out the same values.
Mistakes in the config or the data end the run with one ``error: ...`` line and exit status 2
(``torchspec.draft_models.errors``: the exit codes of every torchspec command).
Launch on several processes with ``torchrun --nproc-per-node N -m torchspec.trainer.cli train ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from torchspec.draft_models.errors import cli_main

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchspec-trainer", description="Train EAGLE-3 draft models online.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a draft against a live target")
    train.add_argument("--config", help="YAML config file (default: the embedded demo config)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optimizer.learning_rate=5e-5")
    dump = commands.add_parser(
        "dump-states", help="write the target's hidden states of the training data to target.dump_dir (vLLM)"
    )
    dump.add_argument("--config", help="YAML config file: the same one training will use")
    dump.add_argument("--shard-size", type=int, default=256, help="samples per shard file (default 256)")
    dump.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. target.dump_dir=dumps/run1")
    serve = commands.add_parser(
        "serve-command",
        help="print the `vllm serve` command of a states server for target.backend=fleet",
    )
    serve.add_argument("--config", help="YAML config file: the same one training will use")
    serve.add_argument("--port", type=int, default=8000, help="the server's port (default 8000)")
    serve.add_argument("--host", default="0.0.0.0", help="the address it listens on (default 0.0.0.0)")
    serve.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="e.g. target.states_dir=/shared/states"
    )
    commands.add_parser(
        "evaluate", help="real speculative decoding of an exported draft (see evaluate --help)", add_help=False
    )
    commands.add_parser(
        "verify", help="serve the draft in vLLM beside the evaluator (see verify --help)", add_help=False
    )
    commands.add_parser(
        "bench",
        help="acceptance length of a draft or of a run's checkpoints, with intervals and pictures (see bench --help)",
        add_help=False,
    )
    commands.add_parser(
        "regenerate",
        help="rewrite a dataset's assistant answers with the target on vLLM (see regenerate --help)",
        add_help=False,
    )
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="[torchspec %(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("datasets", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_library_bars()


def _quiet_library_bars() -> None:
    """Per-file bars of datasets and transformers (on stderr even off a terminal) would interleave
    with the training log and bury a command's one-line error."""
    import datasets.utils.logging
    import transformers.utils.logging

    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _is_program() -> bool:
    """This module runs as the program (``python -m``, ``torchrun -m``), not imported by a caller
    whose process must not be replaced."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec is not None and spec.name == "torchspec.trainer.cli"


@cli_main(
    interrupted="interrupted; run the same command again to resume from the last checkpoint (checkpoint.resume=auto)"
)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate"]:
        from torchspec.trainer.commands.evaluate import main as evaluate_main

        _quiet_library_bars()
        return evaluate_main(argv[1:])
    if argv[:1] == ["bench"]:
        from torchspec.trainer.commands.bench import main as bench_main

        _quiet_library_bars()
        return bench_main(argv[1:])
    if argv[:1] == ["verify"]:
        from torchspec.trainer.commands.verify import main as verify_main

        return verify_main(argv[1:])
    if argv[:1] == ["regenerate"]:
        from torchspec.trainer.commands.regenerate import main as regenerate_main

        _setup_logging()  # one line per turn of the conversations while the engine generates
        return regenerate_main(argv[1:])
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    # argparse fills the `overrides` positional from one run of arguments only, so overrides after
    # `--config FILE` come back unrecognized; they are overrides too, in command-line order.
    late_overrides = [arg for arg in unknown if not arg.startswith("-")]
    unknown = [arg for arg in unknown if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *late_overrides]

    from torchspec.trainer.config import load_config

    _setup_logging()
    config = load_config(args.config, args.overrides)
    if args.command == "train" and _is_program():
        from torchspec.trainer.distributed.host_memory import relaunch_with_tcmalloc
        from torchspec.trainer.distributed.process_group import device_type

        if device_type(config.training.device) == "cpu":
            relaunch_with_tcmalloc()  # a CPU step is ~10% faster on tcmalloc (host_memory); returns if it cannot
    from torchspec.trainer.loop.run import train

    if (
        args.command == "train" and os.environ.get("RANK", "0") == "0"
    ):  # `converter:export` etc. without a path then use this run
        from torchspec.draft_models.run_pointer import record_last_run

        record_last_run(config.training.output_dir)

    if args.command == "serve-command":
        from torchspec.trainer.commands.serve_command import print_serve_command

        print_serve_command(config, port=args.port, host=args.host)
        return 0
    if args.command == "dump-states":
        from torchspec.trainer.commands.dump_states import dump_states

        dump_states(config, shard_size=args.shard_size)
        return 0
    train(config)
    return 0


if __name__ == "__main__":
    from torchspec.trainer.distributed.process_group import exit_process

    exit_process(main())

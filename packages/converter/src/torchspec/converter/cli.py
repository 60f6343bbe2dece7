"""``hatch run converter:export`` and ``hatch run converter:check``.

export [--input CKPT] [--output DIR] [--dtype float16|bfloat16|float32] [--include-embeddings]
       [--target-model-path DIR] [--force]
       [--prune-vocab --draft-vocab-size N --dataset-path P --tokenizer DIR --chat-template NAME]
       [--analyze-vocab --dataset-path P --tokenizer DIR --chat-template NAME]
check FOLDER

Exit codes (``torchspec.draft_models.errors``): 0 done; 1 ``check`` found errors in the folder;
2 a user error, one ``error: ...`` line on stderr; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torchspec.converter.errors import ConverterError
from torchspec.draft_models.errors import cli_main
from torchspec.draft_models.run_pointer import last_run, serving_folder

COVERAGE_SIZES = (1000, 2000, 4000, 8000, 16000, 32000, 64000)


def _require_data_options(args) -> None:
    missing = [
        flag
        for flag, value in (
            ("--dataset-path", args.dataset_path),
            ("--tokenizer", args.tokenizer),
            ("--chat-template", args.chat_template),
        )
        if value is None
    ]
    if missing:
        raise ConverterError(f"{'--prune-vocab' if args.prune_vocab else '--analyze-vocab'} needs {', '.join(missing)}")


def _supervised_counts(args, vocab_size: int):
    from transformers import AutoTokenizer

    from torchspec.data import build_training_dataset, count_supervised_tokens

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset, stats = build_training_dataset(args.dataset_path, tokenizer, args.chat_template, args.max_seq_length)
    print(stats.summary())
    return count_supervised_tokens(dataset, vocab_size)


def _run_checkpoint(run_dir) -> Path:
    """The checkpoint of ``run_dir`` an export without ``--input`` takes: the best one (best.json)
    when it is there and complete, else the newest; one line says which and why."""
    from torchspec.draft_models.checkpoint_layout import is_complete, read_best, resolve_checkpoint

    best = read_best(run_dir)
    if best is not None and is_complete(Path(run_dir) / best.name):
        step = f" at step {best.step}" if best.step is not None else ""
        print(
            f"exporting the best checkpoint of {run_dir}: {best.name} (best.json: {best.metric} {best.value:.3f}{step})"
        )
        return Path(run_dir) / best.name
    latest = resolve_checkpoint(run_dir)
    why = "no best.json" if best is None else f"best.json names {best.name}, which is not a complete checkpoint"
    print(f"exporting the latest checkpoint of {run_dir}: {latest.name} ({why})")
    return latest


def _export(args) -> int:
    from torchspec.converter.export import export_checkpoint
    from torchspec.converter.vocab_pruning import restrict_counts_to_draft_vocab
    from torchspec.draft_models.checkpoint_layout import TrainingCheckpoint

    source = args.input or last_run()
    checkpoint = TrainingCheckpoint.open(source if args.input is not None else _run_checkpoint(source))
    config = checkpoint.config
    if args.analyze_vocab:
        _require_data_options(args)
        from torchspec.data import coverage_report

        counts = _supervised_counts(args, config.vocab_size)
        print(f"{'draft vocab':>12}  {'coverage of supervised tokens':>30}")
        for size, share in coverage_report(counts, [s for s in COVERAGE_SIZES if s <= config.vocab_size]):
            print(f"{size:>12}  {share:>29.2%}")
        return 0
    new_ids = None
    if args.prune_vocab:
        if args.draft_vocab_size is None:
            raise ConverterError("--prune-vocab needs --draft-vocab-size N")
        if not 0 < args.draft_vocab_size <= config.draft_vocab_size:
            raise ConverterError(
                f"--draft-vocab-size {args.draft_vocab_size} must be in [1, {config.draft_vocab_size}] "
                f"(the checkpoint's draft vocabulary)"
            )
        _require_data_options(args)
        from torchspec.data import build_vocab_mapping

        counts = _supervised_counts(args, config.vocab_size)
        old_d2t = checkpoint.load_tensor("d2t") if config.is_vocab_pruned else None
        mapping = build_vocab_mapping(
            restrict_counts_to_draft_vocab(counts, old_d2t), config.vocab_size, args.draft_vocab_size
        )
        new_ids = mapping.draft_to_target_ids()
    elif args.draft_vocab_size is not None:
        raise ConverterError("--draft-vocab-size only applies with --prune-vocab")
    result = export_checkpoint(
        checkpoint.path if args.input is None else args.input,
        args.output or (serving_folder(source) if args.input is None else None),
        args.dtype,
        args.include_embeddings,
        args.target_model_path,
        args.force,
        new_ids,
    )
    for finding in result.findings:
        print(finding)
    print(
        f"exported {result.checkpoint} -> {result.output} ({result.num_parameters / 1e6:.1f}M parameters, "
        f"draft vocab {result.draft_vocab_size})"
    )
    return 0


def _check(args) -> int:
    from torchspec.draft_models.serving_folder import check_serving_folder

    args.folder = args.folder or str(serving_folder(last_run()))
    findings = check_serving_folder(args.folder)
    for finding in findings:
        print(finding)
    errors = sum(f.level == "error" for f in findings)
    print(f"{args.folder}: {errors} error(s), {len(findings) - errors} warning(s)")
    return 1 if errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchspec-converter")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="checkpoint -> serving folder")
    export.add_argument(
        "--input",
        help="iter_XXXXXXX folder or training output_dir, meaning its newest checkpoint (default: the best "
        "checkpoint (best.json) of the last training run started in this directory, else outputs/default_llama; "
        "its newest without best.json)",
    )
    export.add_argument("--output", help="output folder (default <input>_hf; without --input, <run>_hf)")
    export.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="weights dtype (default: the draft config's torch_dtype, i.e. the target's)",
    )
    export.add_argument("--include-embeddings", action="store_true")
    export.add_argument("--target-model-path")
    export.add_argument("--force", action="store_true", help="replace an existing output folder")
    export.add_argument("--prune-vocab", action="store_true")
    export.add_argument("--analyze-vocab", action="store_true", help="print draft-vocab coverage, export nothing")
    export.add_argument("--draft-vocab-size", type=int)
    export.add_argument("--dataset-path")
    export.add_argument("--tokenizer")
    export.add_argument("--chat-template")
    export.add_argument("--max-seq-length", type=int, default=2048)
    export.set_defaults(run=_export)
    check = sub.add_parser("check", help="validate a serving folder")
    check.add_argument("folder", nargs="?", help="serving folder (default: the last training run's <output_dir>_hf)")
    check.set_defaults(run=_check)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

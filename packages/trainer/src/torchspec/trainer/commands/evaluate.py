"""``hatch run trainer:evaluate``: real speculative decoding of an exported draft against its target.

Without --data the prompts are the last run's eval split, the samples it held out (reproduced from
its training_config.yaml as the trainer split them), each up to its first supervised token: never
prompts the draft was trained on. With --data, for each conversation, the prompt is everything up to
the last assistant turn rendered with the tokenizer's chat template (generation prompt included).
The target then generates greedily twice,
once alone and once with the draft proposing chains of ``--num-draft-tokens``. The speculative
output must equal the plain one token for token (it is checked, and reported), and the table shows

* acceptance length: mean tokens per target forward pass = accepted draft tokens + 1 bonus token
  (SGLang's and vLLM's convention),
* per-position acceptance: share of rounds in which draft position i was accepted,
* wall time of both decodings and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from torchspec.draft_models.errors import UserInputError, cli_main
from torchspec.trainer.loop.speculative_eval import EvaluationResult, evaluate_prompts, prompts_from_tokenized

__all__ = [
    "EvaluationResult",
    "apply_defaults",
    "at_least_one",
    "chat_prompt_ids",
    "decoding_inputs",
    "eval_split_prompts",
    "evaluate_draft",
    "evaluate_prompts",
    "load_draft_for_target",
    "load_for_evaluation",
    "main",
    "prompts_from_conversations",
    "prompts_from_tokenized",
    "recorded_model_and_data",
    "require_model_folders",
    "write_report",
]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, generation prompt included."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def prompts_from_conversations(data_path: str, tokenizer, prompt_key: str, limit: int) -> list[list[int]]:
    """Token ids of each conversation up to its last assistant turn, with the generation prompt."""
    from torchspec.data import DataError, load_conversation_dataset

    try:
        dataset = load_conversation_dataset(data_path, prompt_key)
    except DataError as err:  # e.g. no record has prompt_key: the message lists the keys there are
        raise DataError(f"--data {data_path} with --prompt-key {prompt_key}: {err}") from None
    prompts = []
    for record in dataset:
        messages = [{"role": m["role"], "content": m["content"] or ""} for m in record["conversations"]]
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        context = messages[:last_assistant]
        if not context or context[-1]["role"] == "assistant":
            continue
        prompts.append(chat_prompt_ids(tokenizer, context))
        if len(prompts) >= limit:
            break
    if not prompts:
        raise UserInputError(
            f"{data_path}: no conversation with a user turn before an assistant turn to use as a prompt"
        )
    return prompts


def evaluate_draft(
    draft_path: str,
    target_path: str,
    data_path: str,
    num_prompts: int = 8,
    max_new_tokens: int = 64,
    num_draft_tokens: int = 4,
    prompt_key: str = "conversations",
    prompts: list[list[int]] | None = None,
    prompt_source: str | None = None,
) -> EvaluationResult:
    """``prompts`` (with ``prompt_source`` saying where they come from) instead of ``data_path``'s."""
    from transformers import AutoTokenizer

    draft, target = load_for_evaluation(draft_path, target_path)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    if prompts is None:
        prompts = prompts_from_conversations(data_path, tokenizer, prompt_key, num_prompts)
        prompt_source = prompt_source or f"{data_path} (--data)"
    result = evaluate_prompts(
        draft,
        target,
        prompts,
        max_new_tokens,
        num_draft_tokens,
        tokenizer.eos_token_id,
        draft_name=str(draft_path),
        target_name=str(target_path),
    )
    result.prompt_source = prompt_source or ""
    return result


def eval_split_prompts(run_dir: str | Path, limit: int) -> tuple[list[list[int]], str]:
    """The first ``limit`` prompts of the samples run ``run_dir`` held out (its training_config.yaml;
    the default run's config where it has none yet), split as the trainer splits them
    (``loop.training_data.load_training_data``), each up to its first supervised token; and a phrase
    naming them."""
    import yaml

    from torchspec.trainer.config import TrainConfig, config_from_dict, upgrade_saved_config
    from torchspec.trainer.loop.training_data import load_training_data
    from torchspec.trainer.targets.resolve import load_tokenizer, resolve_target_path

    saved = Path(run_dir) / "training_config.yaml"
    config = TrainConfig()
    if saved.is_file():
        config = config_from_dict(upgrade_saved_config(yaml.safe_load(saved.read_text()) or {}), source=str(saved))
    d = config.data
    if d.eval_path is None and d.eval_split == 0:
        raise UserInputError(
            f"{run_dir} holds out no eval split (data.eval_split is 0 and data.eval_path is null in {saved}); "
            "pass --data FILE with conversations it was not trained on"
        )
    m = config.model
    tokenizer = load_tokenizer(m.tokenizer_path or resolve_target_path(m.target_model_path), m.trust_remote_code)
    held_out = load_training_data(d, tokenizer, config.training.seed, is_main=True).eval
    prompts = prompts_from_tokenized(held_out, limit)
    if not prompts:
        raise UserInputError(f"the eval split of {run_dir} holds no prompt; pass --data FILE")
    if d.eval_path is not None:
        return prompts, f"the eval split of {run_dir} (data.eval_path {d.eval_path})"
    split = f"data.eval_split {d.eval_split} of {d.train_path}, seed {config.training.seed}"
    return prompts, f"the eval split of {run_dir} ({split})"


def require_model_folders(draft_path: str, target_path: str) -> None:
    for label, path in (("--draft", draft_path), ("--target", target_path)):
        if not (Path(path) / "config.json").is_file():
            raise UserInputError(f"{label} {path}: no config.json there")


def load_for_evaluation(draft_path: str, target_path: str):
    """``(draft, target)`` in float32, the draft with the embedding table a serving engine gives it."""
    import torch

    from torchspec.trainer.targets.in_process import load_causal_lm

    require_model_folders(draft_path, target_path)
    target = load_causal_lm(target_path, "--target", torch.float32)
    return load_draft_for_target(draft_path, target), target


def load_draft_for_target(draft_path: str, target):
    """The draft folder ``draft_path`` in float32, with the embedding table a serving engine gives
    it beside ``target`` (a model already loaded)."""
    import torch

    from torchspec.draft_models import AutoEagle3DraftModel

    draft = AutoEagle3DraftModel.from_pretrained(draft_path, dtype=torch.float32)
    # vLLM serves a draft with the embed_tokens.weight its folder holds (SGLang too when the hidden
    # sizes differ, the only case the converter exports one by default), else with the target's table.
    if not draft.has_own_embedding:
        target_embedding = target.get_input_embeddings().weight
        if target_embedding.shape != draft.embed_tokens.weight.shape:
            raise UserInputError(
                f"--draft {draft_path}: model.safetensors has no embed_tokens.weight and the target's table "
                f"{tuple(target_embedding.shape)} does not fit the draft's {tuple(draft.embed_tokens.weight.shape)}; "
                "export the draft with its own embedding"
            )
        with torch.no_grad():
            draft.load_embedding(target_embedding)
    return draft


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_decoding_arguments(
    parser: argparse.ArgumentParser, max_new_tokens: int, data_default: str = "the last run's training data"
) -> None:
    """The draft, target, prompts and decoding options shared by ``evaluate`` and ``verify``."""
    parser.add_argument("--draft", help="exported draft folder (default: the last training run's <output_dir>_hf)")
    parser.add_argument("--target", help="Hugging Face target folder (default: the last training run's target)")
    parser.add_argument("--data", help=f"conversations (.jsonl/.json/.parquet; default: {data_default})")
    parser.add_argument("--prompt-key", default="conversations", help="the conversation column of --data")
    parser.add_argument("--num-prompts", type=at_least_one, default=8)
    parser.add_argument("--max-new-tokens", type=at_least_one, default=max_new_tokens)
    parser.add_argument("--num-draft-tokens", type=at_least_one, default=4)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchspec-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_decoding_arguments(parser, max_new_tokens=64, data_default="the last run's eval split, the samples it held out")
    parser.add_argument("--output", help="JSON result file (default: <draft>/speculative_eval.json)")
    return parser


def apply_defaults(args) -> None:
    """Fill --draft, --target and --data left unset from the last training run started in this
    directory (its export, its target and its data), else the default run's."""
    from torchspec.draft_models.run_pointer import last_run, serving_folder
    from torchspec.trainer.config import BUILTIN_SAMPLE_CONVERSATIONS, BUILTIN_TINY_TARGET

    run = last_run()
    recorded = recorded_model_and_data(run)
    if args.draft is None:
        args.draft = str(serving_folder(run))
    if args.target is None:
        args.target = recorded.get("target_model_path") or BUILTIN_TINY_TARGET
    if args.target.startswith("builtin:"):  # the run's target was a built-in one: its cached folder
        from torchspec.trainer.targets.resolve import resolve_target_path

        args.target = str(resolve_target_path(args.target))
    if args.data is None:
        args.data = recorded.get("train_path") or BUILTIN_SAMPLE_CONVERSATIONS
    if args.data == BUILTIN_SAMPLE_CONVERSATIONS:
        from torchspec.data import sample_conversations_path

        args.data = str(sample_conversations_path())


def recorded_model_and_data(run_dir: Path) -> dict:
    """``target_model_path`` and ``train_path`` from the run's training_config.yaml, if it has one."""
    import yaml

    path = Path(run_dir) / "training_config.yaml"
    if not path.is_file():
        return {}
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return {
        "target_model_path": (saved.get("model") or {}).get("target_model_path"),
        "train_path": (saved.get("data") or {}).get("train_path"),
    }


def decoding_inputs(args) -> tuple[str, str, str, int, int, int, str]:
    """The draft, target, data and decoding options of ``evaluate`` and ``verify`` (defaults filled
    in by :func:`apply_defaults`), in the order ``evaluate_draft`` and ``verify_draft`` take them."""
    apply_defaults(args)
    return (
        args.draft,
        args.target,
        args.data,
        args.num_prompts,
        args.max_new_tokens,
        args.num_draft_tokens,
        args.prompt_key,
    )


def write_report(table: str, record: dict, output: str | Path) -> None:
    """Print a command's table, write its JSON record to ``output`` and say where."""
    print(table)
    Path(output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


@cli_main
def main(argv: list[str] | None = None) -> int:
    from torchspec.draft_models.run_pointer import last_run

    args = build_parser().parse_args(argv)
    held_out = eval_split_prompts(last_run(), args.num_prompts) if args.data is None else (None, None)
    result = evaluate_draft(*decoding_inputs(args), *held_out)
    record = {**asdict(result), "speedup": result.speedup}
    write_report(result.table(), record, args.output or Path(args.draft) / "speculative_eval.json")
    return 0 if result.identical_to_target else 1


if __name__ == "__main__":
    sys.exit(main())

"""Tokenized training and held-out conversations (torchspec-data), and the pruned draft vocabulary."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from torchspec.trainer.config import BUILTIN_SAMPLE_CONVERSATIONS, DataConfig
from torchspec.trainer.distributed.process_group import barrier

__all__ = [
    "VOCAB_MAPPING_FILE",
    "TrainingData",
    "data_source",
    "load_training_data",
    "run_vocab_mapping",
    "vocab_mapping_from_data",
]

# The pruned vocabulary a checkpoint was trained with, beside its weights.
VOCAB_MAPPING_FILE = "vocab_mapping.safetensors"

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train: Any  # datasets.Dataset with input_ids, loss_mask
    eval: Any  # the same, or None
    summary: str


def data_source(path: str):
    from torchspec.data import sample_conversations_path

    return sample_conversations_path() if path == BUILTIN_SAMPLE_CONVERSATIONS else path


def _build(path: str, tokenizer, config: DataConfig, key: str):
    from torchspec.data import DataError, build_training_dataset

    try:
        return build_training_dataset(
            data_source(path),
            tokenizer,
            config.chat_template,
            config.max_seq_length,
            num_proc=config.num_proc,
            cache_dir=config.cache_dir,
            prompt_key=config.prompt_key,
        )
    except DataError as err:
        raise DataError(f"{key}: {err}") from None


def load_training_data(config: DataConfig, tokenizer, seed: int, is_main: bool) -> TrainingData:
    """Tokenize (rank 0 first, filling the cache; the other ranks then read it) and split off the
    held-out set: ``eval_path``, else a seeded ``eval_split`` share of the training conversations."""
    if not is_main:
        barrier()
    train, stats = _build(config.train_path, tokenizer, config, "data.train_path")
    evaluation = None
    if config.eval_path is not None:
        evaluation, _ = _build(config.eval_path, tokenizer, config, "data.eval_path")
    if is_main:
        barrier()
    if config.eval_path is None and config.eval_split > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        held_out = max(1, round(config.eval_split * len(train)))
        evaluation = train.select(sorted(order[:held_out]), keep_in_memory=True)
        train = train.select(sorted(order[held_out:]), keep_in_memory=True)
    summary = (
        stats.summary() + f"; {len(train)} for training, {len(evaluation) if evaluation is not None else 0} held out"
    )
    return TrainingData(train, evaluation, summary)


def vocab_mapping_from_data(dataset, vocab_size: int, draft_vocab_size: int):
    """Keep the ``draft_vocab_size`` most frequent supervised target tokens of the training set."""
    from torchspec.data import build_vocab_mapping, count_supervised_tokens

    counts = count_supervised_tokens(dataset, vocab_size)
    mapping = build_vocab_mapping(counts, vocab_size, draft_vocab_size)
    covered = counts[mapping.draft_to_target_ids()].sum().item() / max(counts.sum().item(), 1)
    logger.info(
        "draft vocabulary: %d of %d tokens, covering %.1f%% of supervised tokens",
        draft_vocab_size,
        vocab_size,
        100 * covered,
    )
    return mapping


def run_vocab_mapping(draft_config, continual_training: str | None, train_dataset):
    """The pruned draft vocabulary of a run: the one its ``continual_training`` source was trained
    with (the head's rows follow it), else the most frequent target tokens of the training data;
    None for a full vocabulary."""
    if not draft_config.is_vocab_pruned:
        return None
    if continual_training is not None:
        from torchspec.data import VocabMapping
        from torchspec.trainer.loop.resume import complete_checkpoint

        source = complete_checkpoint(continual_training, "checkpoint.continual_training") / VOCAB_MAPPING_FILE
        if source.is_file():
            return VocabMapping.load(source)
    return vocab_mapping_from_data(train_dataset, draft_config.vocab_size, draft_config.draft_vocab_size)

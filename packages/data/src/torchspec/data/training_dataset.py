"""Conversation source -> tokenized training dataset (``input_ids``, ``loss_mask``) with statistics.

Tokenization runs through ``Dataset.map`` (``num_proc`` workers) into an explicit cache file named by a
fingerprint of everything the output depends on: the data, the tokenizer's content, the template's
definition, ``max_seq_length`` and the rendering options. An identical second call loads that file
instead of tokenizing; changing any input changes the name and tokenizes afresh.

The map keeps one row per record, including invalid and fully unsupervised ones (with a status), so the
statistics are computed from the cached table itself and are the same on a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc

from torchspec.data.errors import DataError
from torchspec.data.loading import read_conversation_records
from torchspec.data.templates import ChatTemplate
from torchspec.data.tokenization import ConversationEncoder, tokenizer_fingerprint

__all__ = ["DatasetStats", "build_training_dataset"]

logger = logging.getLogger(__name__)

# Bump when tokenization or masking changes, so cached datasets are rebuilt.
_TOKENIZATION_VERSION = 1
_KEPT, _INVALID, _NO_SUPERVISED = "kept", "invalid", "no_supervised"


@dataclass
class DatasetStats:
    """What happened to the records of one ``build_training_dataset`` call."""

    read: int = 0  # records in the source, valid or not
    skipped_invalid: int = 0  # malformed records (bad JSON, unknown role, ...) left out
    dropped_no_supervised: int = 0  # valid records with no supervised token (after truncation)
    truncated: int = 0  # kept samples cut at max_seq_length
    kept: int = 0
    supervised_tokens: int = 0  # over kept samples
    total_tokens: int = 0  # over kept samples

    def summary(self) -> str:
        share = self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0
        return (
            f"read {self.read} conversations: kept {self.kept}, skipped {self.skipped_invalid} invalid, "
            f"dropped {self.dropped_no_supervised} with no supervised token, truncated {self.truncated}; "
            f"{self.supervised_tokens} supervised of {self.total_tokens} tokens ({share:.1%})"
        )


def build_training_dataset(
    path: str | os.PathLike | datasets.Dataset,
    tokenizer,
    template: str | ChatTemplate,
    max_seq_length: int | None,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
    prompt_key: str = "conversations",
    keep_reasoning: bool = True,
    last_turn_only: bool = False,
    system_prompt: str | None = None,
    skip_invalid: bool = True,
    split: str = "train",
    return_attention_mask: bool = False,
    use_cache: bool = True,
) -> tuple[datasets.Dataset, DatasetStats]:
    """Load, normalize and tokenize conversations for draft training.

    Returns a dataset with ``input_ids`` (int32) and ``loss_mask`` (int8, 1 on assistant-generated tokens)
    columns, plus ``attention_mask`` when asked, and the ``DatasetStats``. Invalid records are counted and
    skipped, or raise ``DataError`` when ``skip_invalid=False``; a source with no usable sample raises too.
    ``cache_dir`` defaults to ``<datasets cache>/torchspec_data``; ``use_cache=False`` re-tokenizes.
    See ``load_conversation_dataset`` for the accepted ``path`` forms and ``tokenize_conversation`` for
    ``template`` and the rendering options.
    """
    if num_proc < 1:
        raise DataError(f"num_proc must be >= 1, got {num_proc}")
    encoder = ConversationEncoder(
        tokenizer,
        template,
        max_seq_length=max_seq_length,
        keep_reasoning=keep_reasoning,
        last_turn_only=last_turn_only,
        system_prompt=system_prompt,
    )
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "torchspec_data"
    cache_dir.mkdir(parents=True, exist_ok=True)
    records = read_conversation_records(path, prompt_key, split=split, cache_dir=cache_dir / "records")

    fingerprint = _fingerprint(
        data=records._fingerprint,  # datasets' fingerprint; set from file contents by read_conversation_records
        tokenizer=tokenizer_fingerprint(tokenizer),
        template=encoder.template_definition(),
        max_seq_length=max_seq_length,
        keep_reasoning=keep_reasoning,
        last_turn_only=last_turn_only,
        system_prompt=system_prompt,
        return_attention_mask=return_attention_mask,
        version=_TOKENIZATION_VERSION,
    )
    features = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "loss_mask": datasets.List(datasets.Value("int8")),
        "status": datasets.Value("string"),
        "truncated": datasets.Value("bool"),
        "error": datasets.Value("string"),
    }
    if return_attention_mask:
        features["attention_mask"] = datasets.List(datasets.Value("int8"))
    tokenized = records.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,  # None keeps the tokenizer's own Rust threads
        fn_kwargs={"encoder": encoder, "return_attention_mask": return_attention_mask},
        remove_columns=records.column_names,
        features=datasets.Features(features),
        new_fingerprint=fingerprint,
        cache_file_name=str(cache_dir / f"tokenized-{fingerprint}.arrow"),
        load_from_cache_file=use_cache,
        desc="Tokenizing conversations",
    )

    stats, errors = _stats(tokenized)
    if stats.skipped_invalid:
        if not skip_invalid:
            raise DataError(
                f"{errors[0]} ({stats.skipped_invalid} invalid records; pass skip_invalid=True to skip them)"
            )
        logger.warning("skipped %d invalid records; first: %s", stats.skipped_invalid, errors[0])
    if stats.kept == 0:
        reason = f"; first invalid record: {errors[0]}" if errors else ""
        raise DataError(f"no usable training sample in {path}: {stats.summary()}{reason}")

    kept = tokenized.filter(
        _is_kept,
        batched=True,
        input_columns="status",
        new_fingerprint=_fingerprint(tokenized=fingerprint, step="kept"),
        cache_file_name=str(cache_dir / f"kept-{fingerprint}.arrow"),
        load_from_cache_file=use_cache,
    )
    columns = ["input_ids", "loss_mask"] + (["attention_mask"] if return_attention_mask else [])
    return kept.select_columns(columns), stats


def _tokenize_batch(batch: dict, encoder: ConversationEncoder, return_attention_mask: bool) -> dict:
    rows: list[Any] = []  # a dict per conversation (None until the batch encode fills it)
    rendered, rendered_rows = [], []
    for conversation, error in zip(batch["conversations"], batch["error"]):
        if error:
            rows.append({"status": _INVALID, "error": error})
            continue
        try:
            rendered.append(encoder.render(conversation))
        except DataError as failure:
            rows.append({"status": _INVALID, "error": str(failure)})
            continue
        rendered_rows.append(len(rows))
        rows.append(None)

    for row, encoded in zip(rendered_rows, encoder.encode_rendered(rendered)):
        supervised = any(encoded["loss_mask"])
        rows[row] = {**encoded, "status": _KEPT if supervised else _NO_SUPERVISED, "error": ""}

    for record, source in zip(rows, batch["source"]):
        if record["status"] == _INVALID and not record["error"].startswith(source):
            record["error"] = f"{source}: {record['error']}"

    out = {
        "input_ids": [r.get("input_ids", []) for r in rows],
        "loss_mask": [r.get("loss_mask", []) for r in rows],
        "status": [r["status"] for r in rows],
        "truncated": [r.get("truncated", False) for r in rows],
        "error": [r["error"] for r in rows],
    }
    if return_attention_mask:
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
    return out


def _is_kept(statuses: list[str]) -> list[bool]:
    return [status == _KEPT for status in statuses]


def _stats(tokenized: datasets.Dataset) -> tuple[DatasetStats, list[str]]:
    table = tokenized.data  # the Arrow table: column reductions without converting rows to Python
    status = table.column("status")
    kept = pc.equal(status, _KEPT)
    lengths = pc.list_value_length(table.column("input_ids"))
    ones = pc.sum(pc.list_flatten(pc.filter(table.column("loss_mask"), kept))).as_py() or 0
    invalid = pc.equal(status, _INVALID)
    stats = DatasetStats(
        read=len(table),
        skipped_invalid=pc.sum(invalid).as_py() or 0,
        dropped_no_supervised=pc.sum(pc.equal(status, _NO_SUPERVISED)).as_py() or 0,
        truncated=pc.sum(pc.and_(kept, table.column("truncated"))).as_py() or 0,
        kept=pc.sum(kept).as_py() or 0,
        supervised_tokens=int(ones),
        total_tokens=pc.sum(pc.filter(lengths, kept)).as_py() or 0,
    )
    errors = pc.filter(table.column("error"), invalid).to_pylist()[:5]
    return stats, errors


def _fingerprint(**state) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:32]

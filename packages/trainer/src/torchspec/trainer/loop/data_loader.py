"""Distributed, resumable batches of tokenized conversations.

Every optimizer step consumes one *global batch* of ``global_batch_size`` samples. Within an epoch
the samples are visited in a permutation drawn from ``seed + epoch`` (``torch.Generator``), global
batch ``s`` being permutation entries ``[s * G, (s + 1) * G)``; an incomplete last batch is
dropped. Rank ``r`` of ``W`` takes the contiguous ``G / W`` samples ``[r * G / W, (r + 1) * G / W)``
of it and splits them into micro-batches of ``micro_batch_size`` (gradient accumulation), so the
ranks' shards are disjoint and together are exactly the one-process global batch.

Each micro-batch is padded to its own longest sample. The position is ``(epoch, step in epoch)``
in global batches, independent of the world size, so a run resumes exactly, on any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from torchspec.draft_models.errors import UserInputError

__all__ = ["DistributedBatchLoader", "EvalBatches", "MicroBatch", "collate", "pad_token_id", "steps_per_epoch"]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, T] long
    attention_mask: torch.Tensor  # [b, T] long, 1 on tokens
    loss_mask: torch.Tensor  # [b, T] long, 1 on supervised tokens

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            *(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.loss_mask))
        )


def collate(samples: list[dict[str, Any]], pad_token_id: int, max_seq_length: int | None = None) -> MicroBatch:
    """Right-pad ``samples`` (``input_ids``, ``loss_mask``) to the longest one, cut at ``max_seq_length``."""
    ids = [list(s["input_ids"])[:max_seq_length] for s in samples]
    masks = [list(s["loss_mask"])[:max_seq_length] for s in samples]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    loss_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (tokens, mask) in enumerate(zip(ids, masks)):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
        loss_mask[row, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    return MicroBatch(input_ids, attention_mask, loss_mask)


def _take(dataset, indices: list[int]) -> list[dict[str, Any]]:
    if hasattr(dataset, "column_names"):  # a datasets.Dataset: one columnar read
        rows = dataset[indices]
        return [{"input_ids": ids, "loss_mask": mask} for ids, mask in zip(rows["input_ids"], rows["loss_mask"])]
    return [dataset[i] for i in indices]


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Optimizer steps in one epoch: the remainder of the epoch that fills no global batch is dropped."""
    return num_samples // global_batch_size


class DistributedBatchLoader:
    def __init__(
        self,
        dataset,
        global_batch_size: int,
        micro_batch_size: int,
        pad_token_id: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        max_seq_length: int | None = None,
    ):
        per_rank, remainder = divmod(global_batch_size, world_size)
        if remainder or per_rank % micro_batch_size:
            raise UserInputError(
                f"global_batch_size {global_batch_size} must split into {world_size} ranks x whole micro-batches of "
                f"{micro_batch_size}; make it a multiple of {world_size * micro_batch_size}"
            )
        if len(dataset) < global_batch_size:
            raise UserInputError(
                f"the training set has {len(dataset)} samples, fewer than one global batch ({global_batch_size}); "
                "lower training.global_batch_size or add data"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = per_rank // micro_batch_size
        self.pad_token_id = pad_token_id
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.max_seq_length = max_seq_length
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: list[int] = []
        self._order_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.dataset), self.global_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def global_batch_indices(self, epoch: int, step: int) -> list[int]:
        """Dataset indices of global batch ``step`` of ``epoch`` (all ranks)."""
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        start = step * self.global_batch_size
        return self._order[start : start + self.global_batch_size]

    def rank_indices(self, epoch: int, step: int) -> list[int]:
        per_rank = self.global_batch_size // self.world_size
        batch = self.global_batch_indices(epoch, step)
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def next_batches(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch; advances the position."""
        indices = self.rank_indices(self.epoch, self.step_in_epoch)
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        samples = _take(self.dataset, indices)
        size = self.micro_batch_size
        return [
            collate(samples[i : i + size], self.pad_token_id, self.max_seq_length) for i in range(0, len(samples), size)
        ]

    def _identity(self) -> dict[str, int]:
        # What the position means: resuming it under other values would silently change the data order.
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_samples": len(self.dataset)}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, **self._identity()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in self._identity().items():
            if key in state and state[key] != mine:
                raise UserInputError(
                    f"the checkpoint's data position was recorded with {key}={state[key]}, this run has {mine}; "
                    "resume with the same data, seed and global batch size, or use checkpoint.continual_training"
                )
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


class EvalBatches:
    """The whole held-out set once, in order, split over ranks.

    Every rank yields the same number of micro-batches (FSDP's collectives need every rank in
    every forward); a rank whose share ran out yields a copy of sample 0 with an all-zero loss mask,
    which counts nothing.
    """

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        pad_token_id: int,
        rank: int = 0,
        world_size: int = 1,
        max_seq_length: int | None = None,
    ):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self.rank, self.world_size = rank, world_size
        self.max_seq_length = max_seq_length

    def __len__(self) -> int:
        per_round = self.micro_batch_size * self.world_size
        return math.ceil(len(self.dataset) / per_round)

    def __iter__(self):
        size = self.micro_batch_size
        for round_index in range(len(self)):
            start = (round_index * self.world_size + self.rank) * size
            indices = list(range(start, min(start + size, len(self.dataset))))
            if indices:
                samples = _take(self.dataset, indices)
            else:
                filler = dict(self.dataset[0])
                samples = [{"input_ids": filler["input_ids"], "loss_mask": [0] * len(filler["input_ids"])}]
            yield collate(samples, self.pad_token_id, self.max_seq_length)


def pad_token_id(tokenizer) -> int:
    """The id padding is filled with: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padding is masked out everywhere; any id will do

"""The data loader with the target's states of the next batches asked for ahead, for targets whose
states are computed elsewhere (``ServedTarget.prefetches``: an engine) while the draft trains."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from torchspec.trainer.loop.data_loader import DistributedBatchLoader, MicroBatch
from torchspec.trainer.targets.contract import ServedTarget

__all__ = ["PrefetchingLoader"]


@dataclass
class _Ahead:
    position: dict  # the loader's position before this batch: what a checkpoint saves
    batches: list[MicroBatch]
    state_bytes: int  # of its states, as the engine hands them over
    asked: bool = False


class PrefetchingLoader:
    """The data loader, with the target's states of the next ``depth`` global batches requested
    ahead, as long as the states asked for and not trained on yet fit in ``max_bytes`` (the batch
    about to be trained is always asked for). The position it saves and restores is that of the
    next batch it *returns*, so a checkpoint resumes where training was, not where the engine was."""

    def __init__(
        self, loader: DistributedBatchLoader, target: ServedTarget, depth: int, max_bytes: float | None = None
    ):
        self.loader, self.target, self.depth, self.max_bytes = loader, target, depth, max_bytes
        self._ahead: deque[_Ahead] = deque()

    steps_per_epoch = property(lambda self: self.loader.steps_per_epoch)
    epoch = property(lambda self: self.state_dict()["epoch"])  # as the plain loader's: where training is
    accumulation_steps = property(lambda self: self.loader.accumulation_steps)

    def next_batches(self) -> list[MicroBatch]:
        while len(self._ahead) < self.depth + 1:
            position = self.loader.state_dict()
            batches = self.loader.next_batches()
            size = sum(self.target.state_bytes(b.input_ids, b.attention_mask) for b in batches)
            self._ahead.append(_Ahead(position, batches, size))
        outstanding = sum(ahead.state_bytes for ahead in self._ahead if ahead.asked)
        for ahead in self._ahead:  # in order: the engine answers the batches as training needs them
            if ahead.asked:
                continue
            if outstanding and self.max_bytes is not None and outstanding + ahead.state_bytes > self.max_bytes:
                break
            for batch in ahead.batches:
                self.target.prefetch(batch.input_ids, batch.attention_mask)
            ahead.asked, outstanding = True, outstanding + ahead.state_bytes
        return self._ahead.popleft().batches

    def state_dict(self) -> dict[str, int]:
        return dict(self._ahead[0].position) if self._ahead else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.target.discard_pending()
        self._ahead.clear()
        self.loader.load_state_dict(state)

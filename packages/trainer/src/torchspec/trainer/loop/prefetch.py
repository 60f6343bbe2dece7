"""The data loader with the target's states of the next batches asked for ahead, for targets whose
states are computed elsewhere (``ServedTarget.prefetches``: an engine) while the draft trains."""

from __future__ import annotations

from collections import deque

from torchspec.trainer.loop.data_loader import DistributedBatchLoader, MicroBatch
from torchspec.trainer.targets.contract import ServedTarget

__all__ = ["PrefetchingLoader"]


class PrefetchingLoader:
    """The data loader, with the target's states of the next ``depth`` global batches requested
    ahead. The position it saves and restores is that of the next batch it *returns*, so a
    checkpoint resumes where training was, not where the engine was."""

    def __init__(self, loader: DistributedBatchLoader, target: ServedTarget, depth: int):
        self.loader, self.target, self.depth = loader, target, depth
        self._ahead: deque[tuple[dict, list[MicroBatch]]] = deque()

    steps_per_epoch = property(lambda self: self.loader.steps_per_epoch)
    epoch = property(lambda self: self.state_dict()["epoch"])  # as the plain loader's: where training is
    accumulation_steps = property(lambda self: self.loader.accumulation_steps)

    def next_batches(self) -> list[MicroBatch]:
        while len(self._ahead) < self.depth + 1:
            position = self.loader.state_dict()
            batches = self.loader.next_batches()
            for batch in batches:
                self.target.prefetch(batch.input_ids, batch.attention_mask)
            self._ahead.append((position, batches))
        return self._ahead.popleft()[1]

    def state_dict(self) -> dict[str, int]:
        return dict(self._ahead[0][0]) if self._ahead else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.target.discard_pending()
        self._ahead.clear()
        self.loader.load_state_dict(state)

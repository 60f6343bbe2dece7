"""target.backend=vllm: an engine process that ends is started again and asked again, without vLLM.

A stand-in worker answers ``extract`` requests as the engine worker does (one safetensors file per
micro-batch, ``states.i`` of shape ``[T_i, 4, H]``) and can end its process mid-run.

* the engine ending with batches asked ahead: a new one is started, asked again for every batch the
  old one had not answered (and the one being collected), and the states are the same as without
  the restart;
* a request the engine failed while it kept running is raised, not retried;
* after ``max_restarts`` restarts the engine's end is raised as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from torchspec.trainer.engine.launch import EngineError
from torchspec.trainer.targets.engine import EngineTarget
from torchspec.trainer.targets.head import TargetHead

from trainer_test_helpers import save_tiny_qwen3

HIDDEN = 64


def states_of(row: list[int]) -> torch.Tensor:
    ids = torch.tensor(row, dtype=torch.float32)[:, None, None]
    return torch.cos(ids * 0.7 + torch.arange(4.0)[None, :, None] + torch.arange(HIDDEN)[None, None, :] * 0.05)


class StandInWorker:
    """``send``/``reply``/``scratch_dir``/``running``/``close`` as ``EngineWorker``; ends its process
    (every later call raises as the real one does) on the ``dies_at``-th request it receives."""

    started = 0

    def __init__(self, root: Path, dies_at: int | None = None, fails_request: int | None = None):
        StandInWorker.started += 1
        self.scratch_dir = root / f"engine-{StandInWorker.started}"
        (self.scratch_dir / "batches").mkdir(parents=True)
        self.dies_at, self.fails_request = dies_at, fails_request
        self.requests: dict[int, dict] = {}
        self.running, self.closed = True, False

    def send(self, op: str, **request) -> int:
        if not self.running:
            raise EngineError("the vLLM engine process is gone: Killed")
        request_id = len(self.requests)
        self.requests[request_id] = request
        if request_id == self.dies_at:
            self.running = False
        return request_id

    def reply(self, request_id: int) -> dict:
        if not self.running:
            raise EngineError("the vLLM engine process ended (exit code -9) before it could answer")
        if request_id == self.fails_request:
            raise EngineError("vLLM failed a request: prompt too long")
        request = self.requests[request_id]
        save_file({f"states.{i}": states_of(row) for i, row in enumerate(request["prompts"])}, request["out"])
        return {"id": request_id}

    def close(self) -> None:
        self.running, self.closed = False, True


@pytest.fixture
def head(tmp_path):
    return TargetHead.from_pretrained(save_tiny_qwen3(tmp_path / "target"))


BATCHES = [
    (torch.tensor([[3, 4, 5, 0], [6, 7, 8, 9]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])),
    (torch.tensor([[10, 11, 0, 0], [12, 13, 14, 0]]), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])),
    (torch.tensor([[15, 16, 17, 18], [19, 20, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])),
]


def _outputs(target: EngineTarget) -> list[torch.Tensor]:
    for ids, mask in BATCHES:  # all asked ahead, as the prefetching loader does
        target.prefetch(ids, mask)
    return [target(ids, mask).aux_hidden_states for ids, mask in BATCHES]


def test_an_engine_that_ends_is_started_again_and_asked_again_for_what_it_had(head, tmp_path):
    undisturbed = _outputs(EngineTarget(head, StandInWorker(tmp_path / "a"), [1, 2, 3]))
    workers = []

    def start_worker():
        workers.append(StandInWorker(tmp_path / "b"))
        return workers[-1]

    first = StandInWorker(tmp_path / "b", dies_at=1)  # ends once the second batch is asked of it
    target = EngineTarget(head, first, [1, 2, 3], start_worker=start_worker, max_restarts=2)
    outputs = _outputs(target)
    assert target.restarts == 1 and first.closed and len(workers) == 1
    # the new engine was asked for all three batches: none of them had been answered
    assert [request["prompts"] for request in workers[0].requests.values()] == [
        [[3, 4, 5], [6, 7, 8, 9]],
        [[10, 11], [12, 13, 14]],
        [[15, 16, 17, 18], [19, 20]],
    ]
    for got, expected in zip(outputs, undisturbed):
        assert torch.equal(got, expected)


def test_a_failed_request_of_a_running_engine_is_raised(head, tmp_path):
    target = EngineTarget(
        head, StandInWorker(tmp_path, fails_request=0), [1, 2, 3], start_worker=lambda: 1 / 0, max_restarts=3
    )
    with pytest.raises(EngineError, match="prompt too long"):
        target(*BATCHES[0])
    assert target.restarts == 0


def test_no_restarts_left_raises_the_engines_end(head, tmp_path):
    target = EngineTarget(
        head,
        StandInWorker(tmp_path, dies_at=0),
        [1, 2, 3],
        start_worker=lambda: StandInWorker(tmp_path, dies_at=0),
        max_restarts=2,
    )
    with pytest.raises(EngineError, match="exit code -9"):
        target(*BATCHES[0])
    assert target.restarts == 2

"""The target served by vLLM: an engine in its own process computes the hidden states the draft reads.

The engine (``torchspec.trainer.engine.worker``) runs vLLM's ``extract_hidden_states`` method with
a host-side KV connector of ours (``torchspec.trainer.engine.connector``); the trainer talks to it
through ``engine.launch.EngineWorker`` (one JSON line per request and reply, the states in a
safetensors file per micro-batch) and holds only the target's head (``targets.head.TargetHead``).

Online training overlaps the two: ``loop.prefetch.PrefetchingLoader`` draws the next
``prefetch_batches`` global batches ahead and asks the engine for their states at once
(:meth:`EngineTarget.prefetch`), so the engine computes while the draft trains; the bound on
batches ahead is the buffer (and the disk it holds), and the trainer waits when the engine falls
behind.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.config import ConfigError
from torchspec.trainer.engine.launch import EngineError, EngineWorker, check_engine_dtype
from torchspec.trainer.targets.contract import ServedTarget, TargetOutput, batch_key, states_to_output, unpadded_rows
from torchspec.trainer.targets.head import TargetHead

__all__ = ["EngineTarget", "vllm_layer_ids"]

logger = logging.getLogger(__name__)


def vllm_layer_ids(aux_layer_ids: list[int], num_layers: int) -> list[int]:
    """What vLLM is asked for: the aux layers' inputs (vLLM id ``i`` = transformers
    ``output_hidden_states[i]``), then id ``num_layers``, the last layer's output before the final norm."""
    try:
        aux_layer_ids = validate_aux_layer_ids(aux_layer_ids, num_layers, source="aux_layer_ids")
    except UserInputError as err:
        raise ConfigError(str(err)) from None
    return [*aux_layer_ids, num_layers]


@dataclass
class _Request:
    """One micro-batch asked of the engine: what to send again if the engine has to be restarted."""

    rows: list[list[int]]
    width: int
    out: Path = Path()
    request_id: int = -1


class EngineTarget(ServedTarget):
    """The target on a vLLM engine: the trainer's target interface (shape facts, head weights, a
    call that returns a ``TargetOutput``) over an :class:`EngineWorker`.

    ``prefetch(batch)`` asks the engine for a batch's states without waiting; calling the target
    on that batch later collects them (or asks and waits, for a batch nobody prefetched). An engine
    process that ends is started again (``start_worker``, up to ``max_restarts`` times) and asked
    again for every batch it had not answered.
    """

    def __init__(
        self,
        head: TargetHead,
        worker: EngineWorker,
        aux_layer_ids: list[int],
        *,
        start_worker: Callable[[], EngineWorker] | None = None,
        max_restarts: int = 0,
    ):
        super().__init__(head, aux_layer_ids)
        self.worker = worker
        self._start_worker, self.max_restarts, self.restarts = start_worker, max_restarts, 0
        self._pending: dict[str, deque[_Request]] = {}
        self._files = 0

    @classmethod
    def start(
        cls,
        path: str | os.PathLike,
        aux_layer_ids: list[int] | None,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        max_seq_length: int,
        max_restarts: int = 0,
        **worker_options: Any,
    ) -> EngineTarget:
        """Read the head from ``path``, check the aux layer ids, then start the engine
        (``worker_options``: :class:`EngineWorker`'s, e.g. ``engine_options(config)``)."""
        head = TargetHead.from_pretrained(path, dtype, device, worker_options.get("trust_remote_code", False))
        check_engine_dtype(head.config, dtype)
        aux = head.validate_aux_layer_ids(aux_layer_ids)

        starts = 0

        def start_worker() -> EngineWorker:
            nonlocal starts
            options = dict(worker_options)
            log_path = options.get("log_path")
            if starts and log_path is not None:  # the log of the engine that ended stays as it was
                options["log_path"] = Path(log_path).with_suffix(f".restart-{starts}.log")
            starts += 1
            return EngineWorker(
                path,
                layer_ids=vllm_layer_ids(aux, head.num_layers),
                dtype=str(dtype).removeprefix("torch."),
                max_model_len=max_seq_length + 2,  # the prompt and the one token generated
                **options,
            )

        return cls(head, start_worker(), aux, start_worker=start_worker, max_restarts=max_restarts)

    prefetches = True

    def prefetch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._ask(input_ids, attention_mask)

    def _ask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        request = _Request(unpadded_rows(input_ids, attention_mask), input_ids.shape[1])
        self._send(request)
        self._pending.setdefault(batch_key(input_ids, attention_mask), deque()).append(request)

    def _send(self, request: _Request) -> None:
        while True:
            request.out = self.worker.scratch_dir / "batches" / f"{self._files}.safetensors"
            self._files += 1
            try:
                request.request_id = self.worker.send("extract", prompts=request.rows, out=str(request.out))
                return
            except EngineError as err:
                self._restart_or_raise(err)

    def _collect(self, request: _Request) -> None:
        while True:
            try:
                self.worker.reply(request.request_id)
                return
            except EngineError as err:
                self._restart_or_raise(err)
                self._send(request)  # not among the pending ones: it was taken for training

    def _restart_or_raise(self, err: EngineError) -> None:
        """Start the engine again after its process ended, and ask it again for every batch pending;
        anything else (a failed request, no restarts left) is raised."""
        if self.worker.running or self._start_worker is None or self.restarts >= self.max_restarts:
            raise err
        self.restarts += 1
        pending = [request for requests in self._pending.values() for request in requests]
        logger.warning(
            "%s; starting the engine again (restart %d of at most %d, target.max_engine_restarts) and asking it "
            "again for the %d micro-batches it had",
            err,
            self.restarts,
            self.max_restarts,
            len(pending),
        )
        self.worker.close()
        self.worker = self._start_worker()
        for request in pending:
            self._send(request)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key = batch_key(input_ids, attention_mask)
        if not self._pending.get(key):
            self._ask(input_ids, attention_mask)
        request = self._pending[key].popleft()
        if not self._pending[key]:
            del self._pending[key]
        self._collect(request)
        return self._load(request.out, request.width, input_ids.device)

    def _load(self, path: Path, width: int, device: torch.device) -> TargetOutput:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        path.unlink()
        states = [tensors[f"states.{i}"] for i in range(len(tensors))]
        return states_to_output(states, width, self.head.final_norm, device)

    def discard_pending(self) -> None:
        """Collect and delete the states of every prefetched batch (a resume changes what comes next)."""
        while self._pending:
            key = next(iter(self._pending))
            request = self._pending[key].popleft()
            if not self._pending[key]:
                del self._pending[key]
            self._collect(request)
            request.out.unlink(missing_ok=True)

    def close(self) -> None:
        self.worker.close()

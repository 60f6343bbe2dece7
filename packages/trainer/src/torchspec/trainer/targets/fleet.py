"""The target served by a fleet of ``vllm serve`` processes (``target.backend=fleet``), for any
number of trainer ranks.

Each rank holds only the target's head and a :class:`~torchspec.trainer.engine.fleet.ServerFleet`
client. ``prefetch`` sends one request per sample of a micro-batch (spread over the servers);
calling the target collects the replies, reads each sample's states from the file the server's
connector wrote, with ``hs_connectors``' filesystem transfer (it waits on the writer's lock file),
checks them against the request (the token ids the server computed must be the ones asked for,
the shape ``[T, layers, H]``), deletes the file and returns the batch's ``TargetOutput``. A state
that does not match its request stops training with one line naming the server: never silent
training on the wrong states.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future
from typing import Any

import torch

from torchspec.trainer.config import ConfigError
from torchspec.trainer.engine.fleet import FleetReply, ServerFleet
from torchspec.trainer.engine.launch import EngineError, check_engine_dtype
from torchspec.trainer.targets.contract import ServedTarget, TargetOutput, batch_key, states_to_output, unpadded_rows
from torchspec.trainer.targets.engine import vllm_layer_ids
from torchspec.trainer.targets.head import TargetHead

__all__ = ["FleetTarget"]

# A writer still holding its lock after this long is treated as failed for that sample.
_READ_ATTEMPTS = 6


class FleetTarget(ServedTarget):
    prefetches = True

    def __init__(self, head: TargetHead, aux_layer_ids: list[int], fleet: ServerFleet):
        super().__init__(head, aux_layer_ids)
        self.fleet = fleet
        self._pending: dict[str, deque[list[Future[FleetReply]]]] = {}
        self._transfer: Any = None

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike,
        aux_layer_ids: list[int] | None,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        servers: list[str],
        timeout_s: float,
        request_timeout_s: float,
        trust_remote_code: bool = False,
    ) -> FleetTarget:
        """Read the head from ``path``, check the aux layer ids, then check every server serves them."""
        if not servers:
            raise ConfigError(
                "target.backend is fleet but target.servers is empty; list the states servers' URLs "
                "(`trainer serve-command --config FILE` prints the command that starts one)"
            )
        head = TargetHead.from_pretrained(path, dtype, device, trust_remote_code)
        check_engine_dtype(head.config, dtype)
        aux = head.validate_aux_layer_ids(aux_layer_ids)
        fleet = ServerFleet(servers, vllm_layer_ids(aux, head.num_layers), timeout_s, request_timeout_s)
        try:
            fleet.check_servers()
        except BaseException:
            fleet.close()
            raise
        return cls(head, aux, fleet)

    def _reader(self) -> Any:
        if self._transfer is None:
            try:
                from hs_connectors import FileTransfer
            except ImportError:
                raise ConfigError(
                    "target.backend=fleet reads the servers' states with hs-connectors, which is not installed: "
                    "pip install hs-connectors"
                ) from None
            self._transfer = FileTransfer(hidden_states_path=None)
        return self._transfer

    def prefetch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._ask(input_ids, attention_mask)

    def _ask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        futures = [self.fleet.submit(row) for row in unpadded_rows(input_ids, attention_mask)]
        self._pending.setdefault(batch_key(input_ids, attention_mask), deque()).append(futures)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key = batch_key(input_ids, attention_mask)
        if not self._pending.get(key):
            self._ask(input_ids, attention_mask)
        futures = self._pending[key].popleft()
        if not self._pending[key]:
            del self._pending[key]
        rows = unpadded_rows(input_ids, attention_mask)
        states = [self._states(future.result(), row) for future, row in zip(futures, rows)]
        return states_to_output(states, input_ids.shape[1], self.head.final_norm, input_ids.device)

    def _states(self, reply: FleetReply, prompt: list[int]) -> torch.Tensor:
        tensors = self._read(reply)
        for _ in range(len(self.fleet.urls) + 1):
            if tensors is not None:
                break
            # The server answered, then died before its connector wrote the file: ask again.
            self.fleet.set_aside(reply.server, "answered without writing its states file")
            reply = self.fleet.submit(prompt).result()
            tensors = self._read(reply)
        path = reply.kv_transfer_params["hidden_states_path"]
        if tensors is None:
            raise EngineError(f"the server {reply.server} did not write the states file {path}")
        self._delete(path)
        token_ids = tensors.get("token_ids")
        if token_ids is None or token_ids.tolist() != prompt:
            raise EngineError(
                f"the server {reply.server} returned the states of other tokens than asked for ({path}); "
                "is another process using its states folder?"
            )
        hidden = tensors.get("hidden_states")
        expected = (len(prompt), len(self.fleet.layer_ids), self.hidden_size)
        if hidden is None or tuple(hidden.shape) != expected or not hidden.is_floating_point():
            got = None if hidden is None else (tuple(hidden.shape), hidden.dtype)
            raise EngineError(
                f"the server {reply.server} returned states {got}, expected shape {expected} "
                "(tokens, layers, hidden size): does it serve this target?"
            )
        return hidden.to(self.lm_head_weight.dtype)

    def _read(self, reply: FleetReply) -> dict[str, torch.Tensor] | None:
        for _ in range(_READ_ATTEMPTS):
            try:
                return self._reader().get_generated(reply.kv_transfer_params)
            except TimeoutError:  # the writer still holds its lock: wait on it again
                continue
        return None

    def _delete(self, path: str) -> None:
        for leftover in (path, path + ".lock"):
            try:
                os.remove(leftover)
            except FileNotFoundError:
                pass

    def discard_pending(self) -> None:
        """Collect and delete the states of every prefetched batch (a resume changes what comes next)."""
        for batches in self._pending.values():
            for futures in batches:
                for future in futures:
                    try:
                        self._delete(future.result().kv_transfer_params["hidden_states_path"])
                    except EngineError:
                        pass
        self._pending.clear()

    def close(self) -> None:
        self.fleet.close()

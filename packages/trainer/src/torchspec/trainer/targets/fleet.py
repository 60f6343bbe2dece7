"""The target served by a fleet of ``vllm serve`` processes (``target.backend=fleet``), for any
number of trainer ranks.

Each rank holds only the target's head and a :class:`~torchspec.trainer.engine.fleet.ServerFleet`
client. ``prefetch`` sends one request per sample of a micro-batch (spread over the servers);
calling the target collects the replies, reads each sample's states with ``hs_connectors`` by the
configured transport (``target.transport``: ``file``, the file the server's connector wrote, waiting
on the writer's lock file; ``mooncake``, the object it published in a Mooncake store, waiting until
it is there), checks them against the request (the token ids the server computed must be the ones
asked for, the shape ``[T, layers, H]``), deletes the file or object and returns the batch's
``TargetOutput``. A state that does not match its request stops training with one line naming the
server: never silent training on the wrong states.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from torchspec.trainer.config import ConfigError
from torchspec.trainer.engine.fleet import FleetReply, ServerFleet
from torchspec.trainer.engine.launch import EngineError, check_engine_dtype
from torchspec.trainer.engine.servers import ServerSupervisor
from torchspec.trainer.targets.contract import ServedTarget, TargetOutput, batch_key, states_to_output, unpadded_rows
from torchspec.trainer.targets.engine import vllm_layer_ids
from torchspec.trainer.targets.head import TargetHead

__all__ = ["FleetTarget"]

# A writer still holding its lock after this long is treated as failed for that sample.
_READ_ATTEMPTS = 6
# How long a Mooncake read waits for an answered sample's object between checks that its server lives.
_MOONCAKE_WAIT_SLICE_S = 2.0


def _hs_connectors_missing() -> ConfigError:
    return ConfigError(
        "target.backend=fleet reads the servers' states with hs-connectors, which is not installed: "
        "pip install hs-connectors"
    )


class _FileStates:
    """States in one safetensors file per request (``kv_transfer_params["hidden_states_path"]``)."""

    reply_key = "hidden_states_path"

    def __init__(self) -> None:
        self._transfer: Any = None

    def read(self, params: dict[str, Any], gone: Callable[[], bool]) -> dict[str, torch.Tensor] | None:
        if self._transfer is None:
            try:
                from hs_connectors import FileTransfer
            except ImportError:
                raise _hs_connectors_missing() from None
            self._transfer = FileTransfer(hidden_states_path=None)
        for _ in range(_READ_ATTEMPTS):
            try:
                return self._transfer.get_generated(params)
            except TimeoutError:  # the writer still holds its lock: wait on it again, unless it died
                if gone():
                    return None
        return None

    def delete(self, params: dict[str, Any]) -> None:
        path = params[self.reply_key]
        for leftover in (path, path + ".lock"):
            try:
                os.remove(leftover)
            except FileNotFoundError:
                pass


class _MooncakeStates:
    """States in one Mooncake object per request (its manifest in ``kv_transfer_params``)."""

    reply_key = "handle"

    def __init__(self, settings: dict[str, Any], timeout_s: float):
        try:
            from hs_connectors.mooncake_store import MooncakeHiddenStatesStore, MooncakeStoreConfig
        except ImportError:
            raise _hs_connectors_missing() from None

        from torchspec.trainer.engine.fleet import mooncake_local_hostname

        os.environ.setdefault("GLOG_minloglevel", "1")  # the store client's INFO lines, per connection
        config = MooncakeStoreConfig.from_dict({"local_hostname": mooncake_local_hostname(), **settings})
        self._store, self.timeout_s = MooncakeHiddenStatesStore(config), timeout_s

    def read(self, params: dict[str, Any], gone: Callable[[], bool]) -> dict[str, torch.Tensor] | None:
        from hs_connectors.mooncake_store import MooncakeIntegrityError

        if not self._store.is_setup:
            try:
                self._store.setup()
            except (ImportError, RuntimeError) as err:
                raise EngineError(f"target.mooncake: this rank cannot join the Mooncake store ({err})") from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:  # in slices: a server that died after answering never publishes the object
                return self._store.get_sample(params, timeout=_MOONCAKE_WAIT_SLICE_S)
            # Never published, the server's error marker, or the object gone with its server's segment:
            # the sample is asked again.
            except (MooncakeIntegrityError, RuntimeError):
                return None
            except TimeoutError:
                if time.monotonic() > deadline or gone():
                    return None

    def delete(self, params: dict[str, Any]) -> None:
        self._store.delete_sample(params[self.reply_key])


class FleetTarget(ServedTarget):
    prefetches = True

    def __init__(
        self,
        head: TargetHead,
        aux_layer_ids: list[int],
        fleet: ServerFleet,
        supervisor: ServerSupervisor | None = None,
        states: _FileStates | _MooncakeStates | None = None,
    ):
        super().__init__(head, aux_layer_ids)
        self.fleet, self.supervisor = fleet, supervisor
        self._states_store = states or _FileStates()
        self._pending: dict[str, deque[list[Future[FleetReply]]]] = {}

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
        supervisor: ServerSupervisor | None = None,
        transport: str = "file",
        mooncake: dict[str, Any] | None = None,
    ) -> FleetTarget:
        """Read the head from ``path``, check the aux layer ids, then check every server serves them
        (``supervisor``: the servers' own, when this process started them; closed with the target;
        ``transport``/``mooncake``: how the states travel, ``target.transport``/``target.mooncake``)."""
        if not servers:
            raise ConfigError(
                "target.backend is fleet but target.servers is empty; list the states servers' URLs "
                "(`trainer serve-command --config FILE` prints the command that starts one)"
            )
        head = TargetHead.from_pretrained(path, dtype, device, trust_remote_code)
        check_engine_dtype(head.config, dtype)
        aux = head.validate_aux_layer_ids(aux_layer_ids)
        states = _MooncakeStates(mooncake or {}, request_timeout_s) if transport == "mooncake" else _FileStates()
        fleet = ServerFleet(
            servers, vllm_layer_ids(aux, head.num_layers), timeout_s, request_timeout_s, reply_key=states.reply_key
        )
        try:
            fleet.check_servers()
        except BaseException:
            fleet.close()
            raise
        return cls(head, aux, fleet, supervisor, states)

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
        where = reply.kv_transfer_params[self._states_store.reply_key]
        if tensors is None:
            raise EngineError(f"the server {reply.server} did not hand over the states {where}")
        self._states_store.delete(reply.kv_transfer_params)
        token_ids = tensors.get("token_ids")
        if token_ids is None or token_ids.tolist() != prompt:
            raise EngineError(
                f"the server {reply.server} returned the states of other tokens than asked for ({where}); "
                "is another process using its states folder or store?"
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
        return self._states_store.read(reply.kv_transfer_params, lambda: self.fleet.failed_since(reply))

    def discard_pending(self) -> None:
        """Collect and delete the states of every prefetched batch (a resume changes what comes next)."""
        for batches in self._pending.values():
            for futures in batches:
                for future in futures:
                    try:
                        self._states_store.delete(future.result().kv_transfer_params)
                    except (EngineError, OSError, RuntimeError):
                        pass
        self._pending.clear()

    def close(self) -> None:
        self.fleet.close()
        if self.supervisor is not None:
            self.supervisor.close()

"""The KV connector that takes the target's hidden states out of vLLM, on any device.

vLLM's ``extract_hidden_states`` speculative method stores, for every token, the residual stream
at the requested layers in a cache-only attention layer; a KV connector reads them from that cache
when the request finishes and writes them to ``{shared_storage_path}/{request id}.safetensors``
(``hidden_states`` ``[T, n_layers, H]``, ``token_ids``). vLLM's bundled example connector copies
through a CUDA stream into pinned memory, which fails on the CPU build ("pin_memory=True requires
a CUDA or other accelerator backend"). This subclass gathers on the host when the cache lives
there and keeps the example's path (async device-to-host copy, writer threads, file locks) on
accelerators.

Loaded by vLLM through ``kv_connector_module_path``; imported only inside the engine process.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

__all__ = ["HostHiddenStatesConnector"]


class _Done:
    """Stands for the CUDA event the example waits on: a host copy is complete when it returns."""

    def query(self) -> bool:
        return True


class HostHiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending: PendingSave) -> None:
        if self._kv_cache is None or self._kv_cache.device.type == "cuda":
            super()._submit_async_write(pending)
            return
        if not self._is_tp_rank_zero:
            return
        block_size = self._block_size
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()
        states = extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0]).clone()
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        save_file({"hidden_states": states, "token_ids": pending.token_ids.clone()}, pending.filename)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is not None:
            os.close(lock_fd)  # a reader waiting on the lock file may go on
        self._req_copy_events[pending.req_id] = _Done()

"""The states servers' Mooncake transport on any device: hs-connectors' Mooncake connector with the
host's "streams" where vLLM's KV cache lives in host memory.

hs-connectors' ``MooncakeHiddenStatesConnector`` publishes each request's states (``hidden_states``
``[T, n_layers, H]``, ``token_ids``) as one object in a Mooncake distributed store, keyed by the
request id, and returns the object's manifest in the request's ``kv_transfer_params``; a trainer
rank on any node reads it from the store (``targets.fleet``). The connector orders its device-to-host
copy with an accelerator stream and event from ``torch.accelerator``, which raises "No accelerator is
available." in a CPU engine. On the host there is nothing to order: the forward pass that wrote the
cache has returned before ``get_finished`` runs, so this subclass hands the connector a stream, an
event and a stream context that do nothing when the cache is in host memory, and leaves the
connector unchanged on accelerators. It also fills ``local_hostname`` (the address the store's
peers reach this process at) from ``MOONCAKE_LOCAL_HOSTNAME`` or the host's name when the config
leaves it out, so one printed command serves on every node.

For upstream: ``hs_connectors.device.accelerator_module`` could return such a host module when
``torch.accelerator.current_accelerator()`` is None, as ``ensure_accelerator_context`` already
tolerates a CPU-only process.

Loaded by vLLM through ``kv_connector_module_path``; imported only inside the engine process.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hs_connectors.mooncake_hidden_states_connector import MooncakeHiddenStatesConnector
from hs_connectors.mooncake_store import MooncakeHiddenStatesStore, MooncakeStoreConfig

from torchspec.trainer.engine.fleet import mooncake_local_hostname

__all__ = ["HostMooncakeHiddenStatesConnector"]


class _HostStream:
    def wait_event(self, event: Any) -> None:
        pass


class _HostEvent:
    def record(self, *args: Any) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostDevice:
    """The part of a ``torch.cuda``-like module the connector uses, for host memory."""

    Stream = _HostStream
    Event = _HostEvent

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class HostMooncakeHiddenStatesConnector(MooncakeHiddenStatesConnector):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        settings = dict(self._kv_transfer_config.get_from_extra_config("mooncake", {}) or {})
        settings.setdefault("local_hostname", mooncake_local_hostname())
        self._store = MooncakeHiddenStatesStore(MooncakeStoreConfig.from_dict(settings))

    def _device(self) -> Any:
        if self._kv_cache is not None and self._kv_cache.device.type == "cpu":
            return _HostDevice
        return super()._device()

"""A running vLLM server's EAGLE-3 draft, swapped for newer weights without a restart: how a
training run measures real acceptance when its target only an engine can serve.

The server runs with this module's :class:`DraftReloadExtension` mixed into its workers
(``--worker-extension-cls``, :data:`WORKER_EXTENSION`) and with ``VLLM_SERVER_DEV_MODE=1``, which
opens vLLM's ``/collective_rpc`` and ``/reset_prefix_cache``. :func:`reload_draft` asks every
worker (all tensor/pipeline ranks) to read the draft's serving folder and load it through vLLM's
layerwise reload, the path vLLM's own weight-transfer engines take, so the weights are processed
again as at start-up (CPU GEMM repacking, quantization); then it drops the prefix cache, whose
blocks hold the old draft's KV too. The folder must be one every worker can read (a shared
filesystem across nodes).

Inside the worker only vLLM, torch and safetensors are imported: the server's environment needs
``torchspec-trainer`` installed, nothing more.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from torchspec.trainer.engine.http import post_json
from torchspec.trainer.engine.launch import EngineError
from torchspec.trainer.engine.served import generation_serve_command

__all__ = [
    "DEV_MODE_ENV",
    "WORKER_EXTENSION",
    "DraftReloadExtension",
    "folder_digest",
    "judge_serve_command",
    "reload_draft",
]

WORKER_EXTENSION = "torchspec.trainer.engine.draft_reload.DraftReloadExtension"
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
_RPC = "torchspec_reload_draft"
_RESET_ATTEMPTS = 5


def judge_serve_command(
    target: str | os.PathLike,
    draft: str | os.PathLike,
    *,
    num_draft_tokens: int = 4,
    engine_args: dict[str, Any] | None = None,
    **server_options: Any,
) -> list[str]:
    """The ``vllm serve`` command of a judge: ``target`` with ``draft`` (any draft of the trained
    draft's architecture and shapes; reloaded before each measurement), the reload extension, and
    per-request speculative-decoding counts (each prompt's, for the interval). It runs with
    :data:`DEV_MODE_ENV` in its environment."""
    args = {
        **(engine_args or {}),
        "worker_extension_cls": WORKER_EXTENSION,
        "per_request_spec_decode_metrics": "summary",
    }
    return generation_serve_command(
        target, draft, num_draft_tokens=num_draft_tokens, engine_args=args, **server_options
    )


def folder_digest(folder: str | os.PathLike) -> str:
    """What identifies a serving folder's weights: a hash of its safetensors files' bytes."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        digest.update(file.name.encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class DraftReloadExtension:
    """Mixed into each vLLM worker: :meth:`torchspec_reload_draft` loads a serving folder's weights
    into the draft the server was started with (same architecture and shapes)."""

    def torchspec_reload_draft(self, folder: str) -> dict[str, Any]:
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        worker: Any = self
        model = worker.get_draft_model()
        if model is None:
            raise RuntimeError("this vLLM server serves no draft model to reload")
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise RuntimeError(f"{folder} holds no *.safetensors file")
        loaded = 0
        with set_current_vllm_config(worker.vllm_config):
            initialize_layerwise_reload(model)
            for file in files:
                tensors = load_file(str(file), device="cpu")
                loaded += len(tensors)
                model.load_weights(iter(tensors.items()))
            finalize_layerwise_reload(model, worker.speculative_config.draft_model_config)
        return {"folder": str(folder), "tensors": loaded, "digest": folder_digest(folder)}


def reload_draft(url: str, folder: str | os.PathLike, timeout_s: float = 600.0) -> dict[str, Any]:
    """Load the serving folder ``folder`` into the draft of the vLLM server at ``url`` (started with
    :data:`WORKER_EXTENSION` and :data:`DEV_MODE_ENV`) and drop its prefix cache; returns what the
    first worker reported (checked: every worker loaded the same folder)."""
    url, folder = url.rstrip("/"), str(Path(folder).resolve())
    body = {"method": _RPC, "args": [folder], "timeout": timeout_s}
    try:
        reply = post_json(url + "/collective_rpc", body, timeout=timeout_s + 30)
    except OSError as err:
        hint = (
            f"start it with --worker-extension-cls {WORKER_EXTENSION} and VLLM_SERVER_DEV_MODE=1 "
            "(a training run logs the whole command at its start)"
        )
        raise EngineError(f"the vLLM server {url} could not reload the draft from {folder} ({err}); {hint}") from None
    except ValueError as err:
        raise EngineError(f"the vLLM server {url} gave a reply that is not JSON to a draft reload ({err})") from None
    results = reply.get("results") if isinstance(reply, dict) else None
    if not results or not all(isinstance(result, dict) for result in results):
        raise EngineError(f"the vLLM server {url} did not reload the draft: {json.dumps(reply)[:300]}")
    digests = {result.get("digest") for result in results}
    if len(digests) != 1:
        raise EngineError(f"the vLLM server {url}'s workers loaded different drafts from {folder}: {sorted(digests)}")
    for attempt in range(_RESET_ATTEMPTS):  # refused while blocks are held (requests still running)
        try:
            reset = post_json(url + "/reset_prefix_cache", {}, timeout=60)
        except (OSError, ValueError) as err:
            raise EngineError(f"the vLLM server {url} did not drop its prefix cache after the reload ({err})") from None
        if reset.get("success", True):
            return dict(results[0])
        time.sleep(0.5 * (attempt + 1))
    raise EngineError(
        f"the vLLM server {url} kept refusing to drop its prefix cache after the reload (it serves other requests?); "
        "a judge must serve nobody else"
    )

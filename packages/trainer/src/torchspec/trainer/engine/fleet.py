"""A fleet of ``vllm serve`` processes that compute the target's hidden states for any number of
trainer ranks.

Each server runs vLLM's OpenAI server with the ``extract_hidden_states`` speculative method and the
project's host-side KV connector (``engine.connector``), writing one safetensors file per request
into a folder every trainer rank can read (``target.states_dir``: a local folder on one node, a
shared file system across nodes). :func:`serve_command` is the exact command line for a config; a
server started any other way is refused before step 1, because its name says which target layers
it extracts (:func:`served_model_name`) and the trainer checks it.

:class:`ServerFleet` is the client side of one trainer rank: a request (one prompt) goes to the
server with the fewest requests outstanding from this rank; a server that refuses the connection,
fails or does not answer within ``request_timeout_s`` is set aside for a while and its request goes
to another; when no server answers for ``timeout_s`` the rank stops with one line naming them.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torchspec.trainer.deprecated_paths import moved_names_getattr
from torchspec.trainer.engine.http import get_json, post_json
from torchspec.trainer.engine.launch import EngineError, is_mla_model

__all__ = [
    "FleetReply",
    "format_command",
    "mooncake_local_hostname",
    "states_transfer_config",
    "ServerFleet",
    "serve_command",
    "vllm_server_command",
    "served_model_name",
]

_NAME_PREFIX = "torchspec-states"
# A server set aside after a failure is tried again after this long (it may have restarted).
_RETRY_AFTER_S = 5.0


def served_model_name(layer_ids: list[int]) -> str:
    """The name a states server is started under: it carries the vLLM layer ids it extracts, which
    the OpenAI API has no other way to tell."""
    return f"{_NAME_PREFIX}:layers={','.join(str(i) for i in layer_ids)}"


def _layers_of(name: str) -> list[int] | None:
    prefix = f"{_NAME_PREFIX}:layers="
    if not name.startswith(prefix):
        return None
    try:
        return [int(part) for part in name.removeprefix(prefix).split(",")]
    except ValueError:
        return None


def mooncake_local_hostname() -> str:
    """The address this process's Mooncake client is reached at: ``$MOONCAKE_LOCAL_HOSTNAME``, else
    the address the host's name resolves to (hs-connectors' rule)."""
    import socket

    return os.environ.get("MOONCAKE_LOCAL_HOSTNAME") or socket.gethostbyname(socket.gethostname())


def states_transfer_config(transport: str, states_dir: str | os.PathLike | None, mooncake: dict | None) -> dict:
    """The KV-transfer config that has a states server hand states over by ``transport``: ``file``
    (one safetensors file per request in ``states_dir``) or ``mooncake`` (one object per request in
    the Mooncake store ``mooncake`` describes: hs-connectors' ``MooncakeStoreConfig`` keys)."""
    if transport == "mooncake":
        return {
            "kv_connector": "HostMooncakeHiddenStatesConnector",
            "kv_connector_module_path": "torchspec.trainer.engine.mooncake_connector",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"mooncake": dict(mooncake or {})},
        }
    return {
        "kv_connector": "HostHiddenStatesConnector",
        "kv_connector_module_path": "torchspec.trainer.engine.connector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": str(states_dir)},
    }


def serve_command(
    target: str | os.PathLike,
    layer_ids: list[int],
    states_dir: str | os.PathLike | None,
    *,
    transport: str = "file",
    mooncake: dict | None = None,
    engine_args: dict[str, Any] | None = None,
    **server_options: Any,
) -> list[str]:
    """The command that starts one states server for a training config (``server_options``:
    :func:`vllm_server_command`'s port, host, dtype, max_model_len, on_cpu, python)."""
    speculative = {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
    }
    transfer = states_transfer_config(transport, states_dir, mooncake)
    return vllm_server_command(
        target,
        served_name=served_model_name(layer_ids),
        options=["--skip-tokenizer-init", "--speculative-config", json.dumps(speculative)],
        engine_args={**(engine_args or {}), "kv_transfer_config": transfer},
        has_mla=is_mla_model(target),
        **server_options,
    )


def vllm_server_command(
    model: str | os.PathLike,
    *,
    served_name: str | None = None,
    options: Sequence[str] = (),
    port: int = 8000,
    host: str = "127.0.0.1",
    dtype: str = "bfloat16",
    max_model_len: int = 4096,
    engine_args: dict[str, Any] | None = None,
    on_cpu: bool = False,
    has_mla: bool = False,
    python: str | None = None,
) -> list[str]:
    """A vLLM OpenAI server's command line (``python -m`` of vLLM's API server, which every vLLM
    build has; ``vllm serve`` takes the same arguments) with this project's CPU settings;
    ``engine_args`` become flags (``tensor_parallel_size: 8`` -> ``--tensor-parallel-size 8``)."""
    command = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    if served_name is not None:
        command += ["--served-model-name", served_name]
    command += ["--host", host, "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len)]
    command += list(options)
    args = dict(engine_args or {})
    if on_cpu:
        args.setdefault("enforce_eager", True)  # compiling costs more than it saves on prefills on CPU
        if has_mla:  # vLLM's CPU rotary kernel mis-rotates MLA (docs/vllm-cpu-mla-rope.md)
            from torchspec.trainer.engine.worker import cpu_mla_compilation_config

            args["compilation_config"] = cpu_mla_compilation_config(args.get("compilation_config"))
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is False or value is None:
            continue
        else:
            command += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return command


def format_command(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


@dataclass
class FleetReply:
    """A server's answer to one prompt: where its states are, and who computed them."""

    server: str
    kv_transfer_params: dict[str, Any]
    prompt_token_ids: list[int] | None = None
    failures_before: int = 0  # the server's failures when it answered (see ServerFleet.failed_since)


@dataclass
class _Server:
    url: str
    outstanding: int = 0
    set_aside_until: float = 0.0
    last_error: str = ""
    answered: int = 0
    failures: int = 0  # requests it refused or failed, and answers found unusable


@dataclass
class ServerFleet:
    """The client of one trainer rank over the states servers ``urls``."""

    urls: list[str]
    layer_ids: list[int]
    timeout_s: float = 900.0  # longest time without any server answering
    request_timeout_s: float = 120.0  # a server silent this long on one request is set aside
    max_workers: int = 16
    reply_key: str = "hidden_states_path"  # what kv_transfer_params carry with this transport
    _servers: list[_Server] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise EngineError("target.servers is empty; list the URLs of the states servers")
        self._servers = [_Server(url.rstrip("/")) for url in self.urls]
        self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="torchspec-fleet")
        self.model_name = served_model_name(self.layer_ids)

    # --- before step 1 ----------------------------------------------------------------------------

    def check_servers(self) -> None:
        """Every server must serve states of this run's layers; one line naming the first that does
        not. A server that cannot be reached yet is left to the requests' retries."""
        for server in self._servers:
            try:
                models = get_json(server.url + "/v1/models", timeout=self.request_timeout_s)
            except OSError:
                continue
            names = [entry.get("id", "") for entry in models.get("data", [])]
            if self.model_name in names:
                continue
            layers = next((_layers_of(name) for name in names if _layers_of(name) is not None), None)
            what = f"the target layers {layers}" if layers is not None else f"{', '.join(names) or 'nothing'}"
            raise EngineError(
                f"the server {server.url} serves {what}, not the states of layers {self.layer_ids} this run reads; "
                "start it with the command `trainer serve-command` prints for this config"
            )

    # --- requests ---------------------------------------------------------------------------------

    def submit(self, prompt: list[int]) -> Future[FleetReply]:
        """Ask the fleet for the states of ``prompt``; the future holds the reply."""
        return self._pool.submit(self._request, list(prompt))

    def _pick(self) -> _Server | None:
        now = time.monotonic()
        with self._lock:
            alive = [s for s in self._servers if s.set_aside_until <= now]
            if not alive:
                return None
            server = min(alive, key=lambda s: s.outstanding)
            server.outstanding += 1
            return server

    def _request(self, prompt: list[int]) -> FleetReply:
        deadline = time.monotonic() + self.timeout_s
        body = json.dumps(
            {
                "model": self.model_name,
                "prompt": prompt,
                "max_tokens": 1,
                "temperature": 0.0,
                "return_token_ids": True,
            }
        ).encode()
        while True:
            server = self._pick()
            if server is None:
                if time.monotonic() > deadline:
                    raise EngineError(self._all_gone())
                time.sleep(0.2)
                continue
            try:
                reply = post_json(server.url + "/v1/completions", body, timeout=self.request_timeout_s)
                params = reply.get("kv_transfer_params") or {}
                if self.reply_key not in params:
                    raise EngineError(
                        f"the server {server.url} returned no hidden states (kv_transfer_params: {params}); "
                        "start it with the command `trainer serve-command` prints"
                    )
                choices = reply.get("choices") or [{}]
                with self._lock:
                    server.answered += 1
                    failures = server.failures
                return FleetReply(server.url, params, choices[0].get("prompt_token_ids"), failures)
            except (OSError, ValueError) as err:  # refused, reset, timed out, 5xx, bad JSON: try another
                with self._lock:
                    server.set_aside_until = time.monotonic() + _RETRY_AFTER_S
                    server.last_error = _one_line(err)
                    server.failures += 1
                if time.monotonic() > deadline:
                    raise EngineError(self._all_gone()) from None
            finally:
                with self._lock:
                    server.outstanding -= 1

    def set_aside(self, url: str, reason: str) -> None:
        """Stop sending to ``url`` for a while (its answer was unusable)."""
        with self._lock:
            for server in self._servers:
                if server.url == url:
                    server.set_aside_until = time.monotonic() + _RETRY_AFTER_S
                    server.last_error = reason
                    server.failures += 1

    def failed_since(self, reply: FleetReply) -> bool:
        """Whether the server that gave ``reply`` has failed since (it may have died, and with it
        the states it had not handed over yet), or does not answer now."""
        with self._lock:
            server = next(s for s in self._servers if s.url == reply.server)
            if server.failures != reply.failures_before:
                return True
        try:
            get_json(reply.server + "/v1/models", timeout=5)
            return False
        except (OSError, ValueError):
            return True

    def _all_gone(self) -> str:
        reasons = "; ".join(f"{s.url}: {s.last_error or 'no answer'}" for s in self._servers)
        return (
            f"no states server answered for {self.timeout_s:.0f} s (target.engine_timeout_s): {reasons}; "
            "the last complete checkpoint is intact: restart the servers and run the same command to resume"
        )

    def answered(self) -> dict[str, int]:
        """Requests each server answered (for the log and tests)."""
        with self._lock:
            return {s.url: s.answered for s in self._servers}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300]


# Names that lived here before torchspec-trainer 0.10.0.
__getattr__ = moved_names_getattr(__name__, "torchspec.trainer.engine.servers", ("VllmServer",), "0.10.0")

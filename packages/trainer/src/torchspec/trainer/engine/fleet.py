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
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchspec.trainer.engine.launch import EngineError, engine_environment, is_mla_model

__all__ = [
    "FleetReply",
    "format_command",
    "ServerFleet",
    "VllmServer",
    "serve_command",
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


def serve_command(
    target: str | os.PathLike,
    layer_ids: list[int],
    states_dir: str | os.PathLike,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    dtype: str = "bfloat16",
    max_model_len: int = 4096,
    engine_args: dict[str, Any] | None = None,
    on_cpu: bool = False,
    python: str | None = None,
) -> list[str]:
    """The command that starts one states server for a training config (``python -m`` of vLLM's
    OpenAI server, which every vLLM build has; ``vllm serve`` takes the same arguments)."""
    speculative = {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
    }
    transfer = {
        "kv_connector": "HostHiddenStatesConnector",
        "kv_connector_module_path": "torchspec.trainer.engine.connector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": str(states_dir)},
    }
    command = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(target),
        "--served-model-name",
        served_model_name(layer_ids),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--skip-tokenizer-init",
        "--speculative-config",
        json.dumps(speculative),
        "--kv-transfer-config",
        json.dumps(transfer),
    ]
    args = dict(engine_args or {})
    if on_cpu:
        args.setdefault("enforce_eager", True)  # compiling costs more than it saves on prefills on CPU
        if is_mla_model(target):  # vLLM's CPU rotary kernel mis-rotates MLA (docs/vllm-cpu-mla-rope.md)
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


@dataclass
class _Server:
    url: str
    outstanding: int = 0
    set_aside_until: float = 0.0
    last_error: str = ""
    answered: int = 0


@dataclass
class ServerFleet:
    """The client of one trainer rank over the states servers ``urls``."""

    urls: list[str]
    layer_ids: list[int]
    timeout_s: float = 900.0  # longest time without any server answering
    request_timeout_s: float = 120.0  # a server silent this long on one request is set aside
    max_workers: int = 16
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
                models = self._get_json(server.url + "/v1/models", timeout=self.request_timeout_s)
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
                reply = self._post_json(server.url + "/v1/completions", body, timeout=self.request_timeout_s)
                params = reply.get("kv_transfer_params") or {}
                if "hidden_states_path" not in params:
                    raise EngineError(
                        f"the server {server.url} returned no hidden states (kv_transfer_params: {params}); "
                        "start it with the command `trainer serve-command` prints"
                    )
                choices = reply.get("choices") or [{}]
                with self._lock:
                    server.answered += 1
                return FleetReply(server.url, params, choices[0].get("prompt_token_ids"))
            except (OSError, ValueError) as err:  # refused, reset, timed out, 5xx, bad JSON: try another
                with self._lock:
                    server.set_aside_until = time.monotonic() + _RETRY_AFTER_S
                    server.last_error = _one_line(err)
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

    @staticmethod
    def _get_json(url: str, timeout: float) -> dict[str, Any]:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())

    @staticmethod
    def _post_json(url: str, body: bytes, timeout: float) -> dict[str, Any]:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            raise OSError(f"HTTP {err.code}: {detail}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300]


class VllmServer:
    """One states server started here as a child process (tests, single-node runs); stopped on
    :meth:`stop` or when the object is used as a context manager."""

    def __init__(self, command: list[str], log_path: str | os.PathLike, url: str, start_timeout_s: float = 600):
        self.command, self.url, self.log_path = command, url, Path(log_path)
        env = engine_environment()
        if "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:  # the in-process default is the worker's
            del env["VLLM_ENABLE_V1_MULTIPROCESSING"]  # a server steps its engine core in its own process
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.close()
                raise EngineError(
                    f"the states server {url} exited (code {self.process.returncode}) before it was ready "
                    f"(log: {self.log_path})"
                )
            try:
                ServerFleet._get_json(url + "/v1/models", timeout=5)
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise EngineError(
            f"the states server {url} was not ready within {start_timeout_s:.0f} s (log: {self.log_path})"
        )

    def kill(self) -> None:
        """SIGKILL the whole server (its engine core too), as a crash would."""
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        self._log.close()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

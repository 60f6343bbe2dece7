"""vLLM servers that are already running (``vllm serve``, any parallelism, any node) as the judge
of a draft: the target served with the draft, and without it.

:func:`run_served` sends every prompt at once as token ids (greedy, exactly ``max_new_tokens``
tokens, EOS ignored, as :func:`~torchspec.trainer.engine.launch.run_vllm` decodes) and reads the
server's speculative-decoding counters from its Prometheus ``/metrics`` before and after (and each
prompt's own counts where the server reports them: ``--per-request-spec-decode-metrics summary``). The
counters are the server's totals, so the server must serve nobody else meanwhile: the generated
tokens it counts must be exactly the ones asked for, or the run is refused rather than reported.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torchspec.trainer.engine.fleet import vllm_server_command
from torchspec.trainer.engine.http import get_json, get_text, post_json
from torchspec.trainer.engine.launch import EngineError, EngineRun, is_mla_model

__all__ = ["generation_serve_command", "run_served", "spec_decode_counters"]

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# The counters' settle time: a request's reply may reach the client before the server records it.
_SETTLE_S = 30.0


def generation_serve_command(
    target: str | os.PathLike,
    draft: str | os.PathLike | None = None,
    *,
    num_draft_tokens: int = 4,
    **server_options: Any,
) -> list[str]:
    """The ``vllm serve`` command of ``target`` with ``draft`` as its EAGLE-3 draft (None: the plain
    target), the pair ``verify --server/--plain-server`` compares (``server_options``:
    :func:`~torchspec.trainer.engine.fleet.vllm_server_command`'s port, host, dtype, engine_args, ...)."""
    import json

    options = []
    if draft is not None:
        speculative = {"method": "eagle3", "model": str(draft), "num_speculative_tokens": num_draft_tokens}
        options = ["--speculative-config", json.dumps(speculative)]
    return vllm_server_command(
        target,
        options=options,
        has_mla=any(is_mla_model(path) for path in (target, draft) if path is not None),
        **server_options,
    )


def spec_decode_counters(metrics_text: str) -> dict[str, Any]:
    """The speculative-decoding and generation counters of a Prometheus text page, summed over the
    server's engines (data parallel): ``num_drafts``, ``num_draft_tokens``, ``num_accepted_tokens``,
    ``accepted_per_position`` (by draft position) and ``generation_tokens``."""
    totals: dict[str, float] = defaultdict(float)
    per_position: dict[int, float] = defaultdict(float)
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, value = match["name"], float(match["value"])
        name = name.removeprefix("vllm:").removesuffix("_total")
        if name == "spec_decode_num_accepted_tokens_per_pos":
            labels = dict(_LABEL.findall(match["labels"] or ""))
            per_position[int(labels["position"])] += value
        elif name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"):
            totals[name.removeprefix("spec_decode_")] += value
        elif name == "generation_tokens":
            totals[name] += value
    counters: dict[str, Any] = {key: int(value) for key, value in totals.items()}
    counters["accepted_per_position"] = [int(per_position[i]) for i in range(len(per_position))]
    return counters


def _counters(url: str, timeout: float) -> dict[str, Any]:
    try:
        return spec_decode_counters(get_text(url + "/metrics", timeout))
    except OSError as err:
        raise EngineError(f"the server {url} gave no /metrics ({err}); start it without --disable-log-stats") from None


def run_served(
    url: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    num_draft_tokens: int | None = None,
    timeout_s: float = 900.0,
) -> EngineRun:
    """Greedy generation of ``prompts`` (token ids) by the running vLLM server at ``url``, with its
    speculative-decoding counters over exactly these requests when it serves a draft
    (``num_draft_tokens``: the draft length it must have)."""
    url = url.rstrip("/")
    try:
        models = get_json(url + "/v1/models", timeout=30)
    except (OSError, ValueError) as err:
        raise EngineError(f"the vLLM server {url} does not answer ({err}); is it running?") from None
    names = [entry.get("id") for entry in models.get("data", []) if entry.get("id")]
    if not names:
        raise EngineError(f"the vLLM server {url} serves no model")
    before = _counters(url, 30)
    drafting = len(before["accepted_per_position"])
    if num_draft_tokens == 0 and drafting:
        raise EngineError(
            f"the vLLM server {url} serves a draft ({drafting} tokens per round); --plain-server must serve the "
            "target alone (verify --print-serve-commands prints how)"
        )
    if num_draft_tokens is not None and drafting != num_draft_tokens:
        has = f"drafts {drafting} tokens per round" if drafting else "serves no draft"
        raise EngineError(
            f"the vLLM server {url} {has}, not {num_draft_tokens}: pass --num-draft-tokens {drafting} or start it "
            "with the command verify --print-serve-commands prints"
        )
    started = time.perf_counter()

    def generate(prompt: list[int]) -> tuple[list[int], dict[str, Any] | None]:
        body = {
            "model": names[0],
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        try:
            reply = post_json(url + "/v1/completions", body, timeout=timeout_s)
        except (OSError, ValueError) as err:
            raise EngineError(f"the vLLM server {url} failed a request: {err}") from None
        tokens = (reply.get("choices") or [{}])[0].get("token_ids")
        if tokens is None:
            raise EngineError(f"the vLLM server {url} returned no token ids (vLLM too old for return_token_ids?)")
        return list(tokens), (reply.get("metrics") or {}).get("speculative_decoding")

    with ThreadPoolExecutor(max_workers=max(1, min(len(prompts), 64))) as pool:  # all at once, as served
        replies = list(pool.map(generate, prompts))
    outputs = [tokens for tokens, _ in replies]
    per_prompt = [stats for _, stats in replies]
    seconds = time.perf_counter() - started
    expected = sum(len(tokens) for tokens in outputs)
    deadline = time.monotonic() + _SETTLE_S
    while True:
        after = _counters(url, 30)
        generated = after.get("generation_tokens", 0) - before.get("generation_tokens", 0)
        if generated >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if generated != expected:
        raise EngineError(
            f"the vLLM server {url} generated {generated} tokens while verify asked for {expected}: it served other "
            "requests meanwhile, so its counters are not this draft's alone; verify against a server nobody else uses"
        )
    delta = {
        key: after.get(key, 0) - before.get(key, 0) for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    }
    per_position = [a - b for a, b in zip(after["accepted_per_position"], before["accepted_per_position"])]
    try:
        version = str(get_json(url + "/version", timeout=30).get("version", ""))
    except (OSError, ValueError):
        version = ""
    reported = all(stats is not None for stats in per_prompt) and bool(per_prompt)
    return EngineRun(
        outputs=outputs,
        engine_version=version or "(version unknown)",
        seconds=seconds,
        accepted_per_position=per_position,
        prompt_rounds=[int(stats["num_spec_steps"]) for stats in per_prompt] if reported else [],  # type: ignore[index]
        prompt_accepted=[int(stats["num_accepted_draft_tokens"]) for stats in per_prompt] if reported else [],  # type: ignore[index]
        **delta,
    )

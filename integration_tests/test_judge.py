"""Real acceptance during training of a target only an engine serves: target.backend=fleet with a
states server the trainer starts, and a vLLM judge server the trainer starts (metrics.start_judge),
whose draft is replaced by the weights as trained before each measurement, without a restart.

The run continues the shared default run's draft (continual_training) for a few steps, so there is
a trained draft to judge without training one here. The judge must measure the draft as trained at
that step: its counts at the last step equal the in-process evaluator's on the last checkpoint, same
prompts, same protocol (greedy, K=4, EOS ignored); and best.json follows what it measured.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
import torch

from torchspec.trainer.commands.bench import draft_folder_from_checkpoint, held_out_prompt_set
from torchspec.trainer.commands.evaluate import load_draft_for_target
from torchspec.trainer.config import load_config
from torchspec.trainer.engine.launch import vllm_available
from torchspec.trainer.loop.acceptance import REAL
from torchspec.trainer.loop.run import train
from torchspec.trainer.loop.speculative_eval import evaluate_prompts
from torchspec.trainer.targets.in_process import load_causal_lm

from e2e_helpers import CONFIGS, FAST, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not vllm_available() and os.environ.get("TORCHSPEC_REQUIRE_ENGINE") != "1",
        reason="vLLM is not installed (hatch run engine:integration runs these)",
    ),
]

STEPS, INTERVAL, PROMPTS, NEW_TOKENS = 4, 2, 8, 32


def test_a_fleet_run_measures_real_acceptance_with_a_vllm_judge(default_target, trained_run, tmp_path):
    out = tmp_path / "run"
    judge_port = free_port()
    overrides = [
        *FAST,
        f"training.output_dir={out}",
        f"training.max_steps={STEPS}",
        f"checkpoint.continual_training={trained_run('llama')}",
        "target.backend=fleet",
        "target.start_servers=1",
        f"target.server_port={free_port()}",
        "metrics.start_judge=true",
        f"metrics.judge_port={judge_port}",
        f"metrics.real_acceptance_interval={INTERVAL}",
        f"metrics.real_acceptance_prompts={PROMPTS}",
        f"metrics.real_acceptance_max_new_tokens={NEW_TOKENS}",
        f"checkpoint.save_interval={INTERVAL}",
    ]
    train(load_config(CONFIGS["llama"], overrides))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    judged = [r for r in records if r.get("split") == "acceptance"]
    assert [r["step"] for r in judged] == [INTERVAL, STEPS]
    assert all(r["judge"].startswith("vllm ") and r["num_prompts"] == PROMPTS for r in judged)
    last = judged[-1]
    assert last["real_acceptance_low"] <= last[REAL] <= last["real_acceptance_high"]

    # The same prompts, protocol and draft (the last step's checkpoint) in process.
    target = load_causal_lm(str(default_target), "target", torch.float32)
    folder = draft_folder_from_checkpoint(out / f"iter_{STEPS:07d}", tmp_path / "last")
    prompts = [p.token_ids for p in held_out_prompt_set(out, PROMPTS).prompts]
    expected = evaluate_prompts(load_draft_for_target(folder, target), target, prompts, NEW_TOKENS, 4, None)
    assert last[REAL] == pytest.approx(expected.acceptance_length, abs=1e-9)
    assert last["real_position_acceptance"] == pytest.approx(expected.position_acceptance, abs=1e-9)
    # Both judged the trained draft; the judge started from the run's initial, untrained one (1.0).
    assert min(r[REAL] for r in judged) > 1.2

    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == REAL
    assert best["value"] == max(r[REAL] for r in judged)
    with pytest.raises(OSError):  # the judge stopped with the run
        urllib.request.urlopen(f"http://127.0.0.1:{judge_port}/v1/models", timeout=5)
